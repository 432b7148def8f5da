"""The session socket in three parts: the state machine (``state``), the session that handles
messages (``session``) and serving a granted request (``serving``)."""
