"""The routes of the fleet server's HTTP API, one ``APIRouter`` per module."""
