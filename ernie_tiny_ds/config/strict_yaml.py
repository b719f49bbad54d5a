"""Strict YAML for recipes and override values.

PyYAML's safe loader keeps the last of two equal keys, so a second `train:` block silently drops the
first: here a repeated key is an error naming both lines. Aliases are shared nodes when loaded, but
every later walk of the recipe (copies, validation, the DeepSpeed JSON) expands them, and a few
hundred bytes of nested aliases expand to billions of values: the expanded size is counted on the
node graph, before anything is built, and refused past a bound, as loaders for untrusted input do.
"""
from __future__ import annotations

import yaml

from ..errors import ConfigError

# a recipe holds a few hundred values; this leaves room for long inline lists (layer maps, labels)
MAX_EXPANDED_VALUES = 100_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Walk:
    """One pass over the composed node graph: expanded sizes (memoised per node, so shared aliases
    cost once), repeated keys, and cycles (an anchor used inside itself)."""

    def __init__(self, loader: yaml.SafeLoader, where):
        self.loader = loader
        self.where = where          # line number -> "file:line" (or the override's text)
        self.sizes: dict[int, int] = {}
        self.open: set[int] = set()

    def size(self, node: yaml.Node, path: str) -> int:
        key = id(node)
        if key in self.sizes:
            return self.sizes[key]
        if key in self.open:
            raise ConfigError(f"{self.where(node.start_mark.line + 1)}: a YAML alias at {path or 'the top'} "
                              f"refers to a value that contains it (an endless structure)")
        self.open.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(self.size(child, f"{path}[{i}]") for i, child in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            self.check_repeats(node, path)
            for key_node, value_node in node.value:
                name = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                total += self.size(key_node, path) + self.size(value_node, f"{path}.{name}" if path else name)
        self.open.discard(key)
        if total > MAX_EXPANDED_VALUES:
            raise ConfigError(f"{self.where(node.start_mark.line + 1)}: YAML aliases expand {path or 'the document'} "
                              f"to more than {MAX_EXPANDED_VALUES:,} values (an alias bomb?); write the values out")
        self.sizes[key] = total
        return total

    def check_repeats(self, node: yaml.MappingNode, path: str) -> None:
        """Explicit keys only: a key that overrides one brought in by a `<<:` merge is what merges are for."""
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            name = self.loader.construct_object(key_node)  # `1` and `0x1` are the same key
            line = key_node.start_mark.line + 1
            if name in first_line:
                dotted = f"{path}.{name}" if path else str(name)
                raise ConfigError(f"{self.where(line)}: key '{dotted}' repeats the one at line {first_line[name]} "
                                  f"(the later would silently replace it); keep one")
            first_line[name] = line


def load(text: str, where) -> object:
    """The YAML document in `text`, checked as the module says; `where(line)` names a place for errors.
    Syntax errors are yaml.YAMLError, as from yaml.safe_load."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _Walk(loader, where).size(node, "")
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{where(1)}: YAML nested too deeply") from None
    finally:
        loader.dispose()
