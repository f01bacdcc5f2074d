"""What ``parley demo`` sets up and talks to: Bright Smile Dental's receptionist.

- :mod:`.clinic` creates (idempotently) the demo org, agent, number, tool and knowledge;
- :mod:`.booking` is the clinic's booking endpoint that the ``book_appointment`` tool calls;
- ``clinic.md`` is the knowledge file (prices, hours, address).
"""
