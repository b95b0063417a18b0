"""Every failure sft_scale raises ends as a documented exit code: each `raise` in the package is
walked (with `ast`) to its error class, which must be one of sft_scale/errors.py's (each with its
exit code from the module's docstring and README "Exit codes"), or one of the few internal
raises listed below with the reason it may keep its type. The classes are then mapped to their
codes through the real wrapper `run_reporting_errors` that train.py and cli.py both use."""

from __future__ import annotations

import ast
import builtins
import functools
import re
from pathlib import Path

import pytest

from sft_scale import errors
from sft_scale.training.preemption import PREEMPTED_EXIT_CODE
from tests.helpers import ROOT

PACKAGE = ROOT / "sft_scale"
ERRORS_MODULE = errors.__name__

# The documented exit codes (errors.py's docstring, README "Exit codes"); 75 is preemption's.
EXIT_CODES = {"ConfigError": 2, "DataError": 2, "CheckpointError": 3, "OutputWriteError": 3,
              "MergeError": 4, "ClusterError": 5, "DivergedError": 6}

# Raises that report no user problem, so they may keep their type: (the function they are in,
# the class) -> why. Keyed by function, not file, so moving a module keeps its entries.
ALLOWED = {
    ("read_state", "ValueError"):
        "caught by read_state's own except and re-raised as CheckpointError naming the file",
    ("_marker_files", "TypeError"):
        "caught by _marker_files's own except: the marker is reported untrusted, not raised",
    ("validate_options", "ValueError"):
        "caught by validate_options's own except and re-raised as ConfigError naming the flag",
    ("positive_int", "argparse.ArgumentTypeError"):
        "argparse turns it into a usage error naming the flag, exit 2",
    ("_port_arg", "argparse.ArgumentTypeError"):
        "argparse turns it into a usage error naming the flag, exit 2",
    ("_zero_arg", "argparse.ArgumentTypeError"):
        "argparse turns it into a usage error naming the flag, exit 2",
    ("Preemption._handle", "SystemExit"):
        "the preempted exit (75) itself, before the first step (tests/unit/test_preemption.py)",
    ("main.get_vocab_base_pre", "SystemExit"):
        "gguf_convert.py runs in a child process; its exit code is read by gguf_export.convert, "
        "which raises ConfigError for it",
    ("encode_example", "ValueError"):
        "data/formats.py only makes the known example kinds: reaching this is a bug",
    ("GlobalBatchSampler.__init__", "ValueError"):
        "build_datasets refuses empty data with a DataError first: reaching this is a bug",
    ("load_model", "RuntimeError"):
        "transformers/bitsandbytes did not quantize a model they were asked to: a library "
        "fault, whose traceback a bug report needs",
    ("ReadOnlyAfterLoad.__setattr__", "AttributeError"):
        "code that writes to a loaded Config is a bug (derived values live on Resolved); the "
        "traceback shows where",
    ("replace_block", "SystemExit"):
        "python -m sft_scale.config_reference, a developer tool: a one-line message and exit 1",
    ("main", "SystemExit"):
        "python -m sft_scale.config_reference --check: exit 1 when README is stale",
}


@functools.cache
def _parse(source: str) -> ast.Module:
    return ast.parse(source)  # read-only here: one parse serves every test


@functools.cache
def _import_map(tree: ast.Module) -> dict[str, tuple[str, str | None]]:
    """Every name the module imports, at the top or inside functions: name -> (module, attr);
    attr None for `import x`."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = (node.module, a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = (a.name, None)
    return names


class Package:
    """The modules of a package as ASTs, and how their names resolve to error classes."""

    def __init__(self, sources: dict[str, tuple[str, str]]):
        """`sources`: module name -> (its path for messages, its text)."""
        self.paths = {m: path for m, (path, _) in sources.items()}
        self.trees = {m: _parse(src) for m, (_, src) in sources.items()}
        self.imports = {m: _import_map(t) for m, t in self.trees.items()}
        self.classes = {m: {n.name: n for n in t.body if isinstance(n, ast.ClassDef)}
                        for m, t in self.trees.items()}

    @classmethod
    def of(cls, root: Path, extra: dict[str, str] | None = None) -> Package:
        """The package in folder `root`, plus `extra` modules (name -> text)."""
        sources = {".".join(p.relative_to(root.parent).with_suffix("").parts)
                   .removesuffix(".__init__"): (str(p.relative_to(root.parent)), p.read_text())
                   for p in sorted(root.rglob("*.py"))}
        sources.update({m: (m.replace(".", "/") + ".py", text)
                        for m, text in (extra or {}).items()})
        return cls(sources)

    def resolve(self, module: str, name: str, seen=()) -> str:
        """The error class `name` (maybe dotted) means in `module`: an errors.py class name, or
        for anything else its dotted name as written ('ValueError', 'argparse.X')."""
        head, _, rest = name.partition(".")
        if (module, name) in seen:
            return name
        seen = (*seen, (module, name))
        if module == ERRORS_MODULE and name in self.classes[module]:
            return name
        if not rest and name in self.classes.get(module, {}):
            node = self.classes[module][name]
            assert not any(isinstance(s, ast.Assign) and "exit_code" in ast.unparse(s)
                           for s in node.body), f"{module}.{name}: exit codes live in errors.py"
            # a local subclass (config._NotFinite) exits as its base does
            return self.resolve(module, ast.unparse(node.bases[0]), seen) if node.bases else name
        if head in self.imports.get(module, {}):
            src, attr = self.imports[module][head]
            path = ".".join(filter(None, [src if attr is None else f"{src}.{attr}", rest]))
            # the longest prefix that is one of our modules holds the rest
            # (`from sft_scale import errors` + `errors.MergeError`, `import sft_scale.errors`)
            parts = path.split(".")
            for k in range(len(parts) - 1, 0, -1):
                if ".".join(parts[:k]) in self.trees:
                    return self.resolve(".".join(parts[:k]), ".".join(parts[k:]), seen)
            return path
        return name

    def raise_sites(self):
        """(module, line, function qualname, class as resolved) of every `raise X` / `raise x`."""
        for module, tree in self.trees.items():
            yield from self._sites(module, tree, [])

    def _sites(self, module, node, stack):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield from self._sites(module, child, [*stack, child])
                continue
            if isinstance(child, ast.Raise) and child.exc is not None:
                qualname = ".".join(n.name for n in stack)
                yield module, child.lineno, qualname, self._class_of(module, child.exc, stack)
            yield from self._sites(module, child, stack)

    def _class_of(self, module, exc, stack) -> str:
        if isinstance(exc, ast.Call):
            return self.resolve(module, ast.unparse(exc.func))
        if isinstance(exc, ast.Name) and stack:  # `bad = ConfigError(...)`, then `raise bad`
            made = [a.value for a in ast.walk(stack[-1]) if isinstance(a, ast.Assign)
                    and isinstance(a.value, ast.Call)
                    and any(isinstance(t, ast.Name) and t.id == exc.id for t in a.targets)]
            if made:
                classes = {self.resolve(module, ast.unparse(c.func)) for c in made}
                return classes.pop() if len(classes) == 1 else f"one of {sorted(classes)}"
        return self.resolve(module, ast.unparse(exc))


def problems(package: Package) -> list[str]:
    """Every raise whose class has no documented exit code and is not on the allow-list."""
    out = []
    for module, line, qualname, cls in package.raise_sites():
        if cls in EXIT_CODES or (qualname, cls) in ALLOWED:
            continue
        where = f"{package.paths[module]}:{line} (in {qualname or 'the module'})"
        if cls == "SftScaleError" or hasattr(builtins, cls) or "." in cls:
            out.append(f"{where}: raise {cls}, not an error class of sft_scale/errors.py with a "
                       "documented exit code. A problem the user can fix raises one of those; "
                       "an internal bug may keep its type, listed in ALLOWED with the reason")
        else:
            out.append(f"{where}: raise {cls}: cannot tell its class; raise an error class "
                       "directly, or assign one to a name in the same function")
    return out


@pytest.fixture(scope="module")
def package():
    return Package.of(PACKAGE)


def test_every_raise_in_the_package_has_a_documented_exit_code_or_a_reason(package):
    found = problems(package)
    assert not found, "\n" + "\n".join(found)


def test_the_allow_list_names_only_raises_that_exist(package):
    sites = {(qualname, cls) for _, _, qualname, cls in package.raise_sites()}
    assert [k for k in ALLOWED if k not in sites] == [], "stale entries: remove them"


def test_every_error_class_raised_is_found_through_imports_and_assignments(package):
    found = {cls for *_, cls in package.raise_sites()}
    # re-exported (sft_scale.config, data.sources), raised through a name (`raise bad`,
    # `raise error from e`) or a local subclass (config._NotFinite): all resolve to errors.py
    assert set(EXIT_CODES) <= found


@pytest.mark.parametrize("source,expected", [
    ("def load(key):\n    raise ValueError(f'bad key {key}')\n",
     "sft_scale/injected.py:2 (in load): raise ValueError, not an error class"),
    ("import json\ndef load(t):\n    raise json.JSONDecodeError('x', t, 0)\n",
     "sft_scale/injected.py:3 (in load): raise json.JSONDecodeError, not"),
    ("from sft_scale.errors import SftScaleError\n"
     "class Mine(SftScaleError):\n    pass\n"
     "def load():\n    err = Mine('x')\n    raise err\n",
     "sft_scale/injected.py:6 (in load): raise SftScaleError, not"),
    ("def load(e):\n    raise e\n", "sft_scale/injected.py:2 (in load): raise e: cannot tell"),
])
def test_a_new_bare_raise_fails_this_check(source, expected):
    found = problems(Package.of(PACKAGE, {"sft_scale.injected": source}))
    assert len(found) == 1 and found[0].startswith(expected), found


def test_a_new_raise_of_a_documented_error_passes_however_it_is_imported():
    source = ("from sft_scale.config import ConfigError\nfrom sft_scale import errors\n"
              "def load(key):\n    raise ConfigError(f'bad key {key}')\n"
              "def save():\n    raise errors.OutputWriteError('disk full')\n")
    assert problems(Package.of(PACKAGE, {"sft_scale.injected": source})) == []


def test_each_error_class_has_its_documented_exit_code():
    defined = {n for n, c in vars(errors).items()
               if isinstance(c, type) and issubclass(c, errors.SftScaleError)
               and c is not errors.SftScaleError}
    assert defined == set(EXIT_CODES), "a new error class needs its documented code here"
    for name, code in EXIT_CODES.items():
        assert getattr(errors, name).exit_code == code, name
    bullet = re.search(r"\*\*Exit codes\*\*(.*?)\n- ", (ROOT / "README.md").read_text(),
                       re.DOTALL).group(1)
    for doc in (bullet, errors.__doc__):
        documented = {int(c) for c in re.findall(r"(?<![\w.])(\d+) [a-zA-Z]", doc)}
        assert documented == {0, *EXIT_CODES.values(), PREEMPTED_EXIT_CODE}, doc


@pytest.mark.parametrize("name", sorted(EXIT_CODES))
def test_the_wrapper_turns_each_class_into_one_line_and_its_code(name, capsys):
    cls = getattr(errors, name)

    def fail() -> int:
        raise cls("out/adapter: No space left on device")

    assert errors.run_reporting_errors(fail) == EXIT_CODES[name]
    out, err = capsys.readouterr()
    assert out == "" and err == f"{cls.label}: out/adapter: No space left on device\n"


def test_the_wrapper_passes_success_through_and_leaves_bugs_their_traceback():
    assert errors.run_reporting_errors(lambda: 0) == 0
    assert errors.run_reporting_errors(lambda: PREEMPTED_EXIT_CODE) == 75

    def bug() -> int:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        errors.run_reporting_errors(bug)
