"""Show code in a notebook: every helper a lesson leans on is printed where it is taught."""

from __future__ import annotations

import inspect

from IPython.display import Markdown


def show_source(*objects) -> Markdown:
    """Render the source of functions or classes as a highlighted code block (nothing hidden)."""
    blocks = []
    for obj in objects:
        module = inspect.getmodule(obj)
        where = f"# from {module.__name__}" if module else ""
        blocks.append(f"```python\n{where}\n{inspect.getsource(obj).rstrip()}\n```")
    return Markdown("\n\n".join(blocks))
