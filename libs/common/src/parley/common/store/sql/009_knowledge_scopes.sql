-- The knowledge API now checks scopes (knowledge:write to upload, knowledge:read to list and
-- search). A key issued with the old default scopes (no scopes named) could use it before, and
-- keeps it: such keys get the two knowledge scopes that new default keys are given. Keys whose
-- scopes were named narrower (calls:read, tools:approve) stay without them.
UPDATE api_keys
   SET scopes = scopes || ARRAY['knowledge:read', 'knowledge:write']
 WHERE scopes = ARRAY['calls:write', 'calls:read'];
