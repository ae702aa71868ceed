"""Alembic migrations. Run them with `skutag db upgrade`; env.py reads the shared Settings."""
