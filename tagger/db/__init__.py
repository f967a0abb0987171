"""Database edge: engines, migrations and the SQL the service runs (``repository``)."""
