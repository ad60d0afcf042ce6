"""Count what the test suite checks, by reading each test's source (docs/testing.md).

    python -m pytest --collect-only -q > /tmp/collected.txt
    python docs/measurements/count_tests.py /tmp/collected.txt

Each collected test (every parametrization counts) is put in the first class whose pattern
its function's source, docstring and the module-level helpers it calls match:

1. reference: compares numbers, with a tolerance, against something computed
   independently of the library: a closed form, a dense float64 solve (torch.linalg), a
   finite difference, a dense re-derivation of a paper's update, a plain-torch or
   torch.optim reference;
2. consistency: compares numbers between two ways the library computes one thing (vmap
   and loop, compiled and eager, sharded and one process, declared and composed features,
   resumed and uninterrupted, Triton and torch);
3. behaviour: everything else (errors and their messages, finiteness, warnings, bitwise
   determinism, documentation programs, shapes).

A reading of source text, not a proof: a test is classed by what it names. The numbers it
prints are those quoted in docs/testing.md and the README.
"""
import ast
import collections
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = re.compile(r"assert_close|allclose|isclose|approx\(|rel_err|relerr|[<>]=? *[0-9.]*e-\d+|atol|rtol")
INDEPENDENT = re.compile(r"linalg\.(solve|inv|lstsq|eigh|pinv)|closed.form|closed_form|dense|re-?deriv|"
                         r"finite.difference|central difference|torch\.optim\.|reference|hessian|jacobian|"
                         r"numpy|np\.|exact\b|by hand|hand-written|written out", re.I)


def classify_functions():
    out = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        src = path.read_text(encoding="utf-8")
        tree = ast.parse(src)
        defs = {n.name: ast.get_source_segment(src, n) or "" for n in ast.walk(tree)
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                called = {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
                text = defs[node.name] + "".join(defs.get(c, "") for c in called if c != node.name)
                if TOLERANCE.search(text):
                    kind = "reference" if INDEPENDENT.search(text) else "consistency"
                else:
                    kind = "behaviour"
                out[(path.name, node.name)] = kind
    return out


def main(collected):
    kinds = classify_functions()
    total, per_file = collections.Counter(), collections.defaultdict(collections.Counter)
    for line in Path(collected).read_text().splitlines():
        if "::" not in line:
            continue
        path, rest = line.split("::", 1)
        name = rest.split("[")[0].split("::")[-1]
        kind = kinds.get((Path(path).name, name), "behaviour")
        total[kind] += 1
        per_file[Path(path).name][kind] += 1
    print(f"{'file':34s} reference consistency behaviour")
    for name, c in sorted(per_file.items()):
        print(f"{name:34s} {c['reference']:9d} {c['consistency']:11d} {c['behaviour']:9d}")
    print(f"{'total':34s} {total['reference']:9d} {total['consistency']:11d} {total['behaviour']:9d}"
          f"   ({sum(total.values())} tests)")


if __name__ == "__main__":
    main(sys.argv[1])
