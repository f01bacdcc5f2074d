-- A sensitive tool call records the fingerprint of its tool's definition (HttpTool.fingerprint)
-- when approval is asked for; the approved call runs only if the definition still has it, so an
-- approval never covers a URL, method or headers the approver was not asked about. NULL for
-- calls that needed no approval, and for calls that waited for one before this migration (they
-- cannot be checked, so an approval of one fails it as changed).
ALTER TABLE tool_calls ADD COLUMN tool_fingerprint text;
