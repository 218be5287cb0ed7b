"""``from utils.errors import UserError`` as before; the type lives in the bottom module ``errors``
(see there), where models/ and datasets/ can raise it without importing from utils/."""
from errors import UserError, one_line

__all__ = ["UserError", "one_line"]
