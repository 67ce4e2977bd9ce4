"""The library every stage shares. No DVC stage owns a module here; stages/<stage>.py import from it."""
