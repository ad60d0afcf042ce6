"""One GPU run that measures everything the design and issue 11 ask of a GPU, in one call of
at most 8 minutes, and writes ONE JSON file, ``$OUT/gpu_results.json`` (OUT defaults to ./out).

    bash bench/gpu.sh                          # on the GPU machine (checks torch first)
    python bench/gpu.py --cpu-dry-run          # here: every section at tiny sizes on CPU (< 2 min)

Sections, in priority order (each has a time cap; a section that would not fit in what is
left of the budget is skipped and recorded as skipped, with the reason; the JSON is
rewritten after every section, so a kill leaves what was done):

1. ``env``: Python, torch, CUDA, cuDNN, triton, GPU name / capability / memory / SMs, driver.
1b. ``memory``: bytes per parameter of each gradient-only method's state and of the peak one
   step adds above it, at world size 1 (bench/memory_methods.py; a 10-block width-2048 MLP,
   peak allocated CUDA bytes).
2. ``kernel_tests``: ``python -m pytest -q tests/test_kernels.py`` with TB_TEST_DEVICE=cuda
   and TRITON_INTERPRET unset (the compiled Triton kernels on CUDA tensors): counts, the
   failing tests and the tail of the log.  (Dry run: a small subset on CPU, interpreted.)
3. ``bandwidth``: the fused FdeHBO/FMBO update (inner_update + project_ball + outer_update,
   bench/bench_kernels.py's functions) at 2^20..2^26 elements per side, float32: eager
   reference, torch.compile of it, foreach, Triton, and a copy of the same bytes; GB/s,
   fractions of copy bandwidth, speed-ups; then, if time is left, an odd size (scalar
   loads) and bfloat16 at 2^24.  Timed with CUDA events, medians.
4. ``step_costs``: bench/step_cost.py's methods (every estimator and algorithm) on each
   problem of ``PROBLEMS``, in gradient units (one ``grad(g, argnums=(0, 1))``), with the
   peak CUDA memory of each; rows timed interleaved, CUDA events, medians.
5. ``pair_modes``: bench/large_y.py's rows on each problem: FdeHBO/FMBO steps, the parts of
   a step and the prototype finite-difference pair modes, and the FLOP-ratio rule's choice.

``targets`` sums up the design's GPU targets: fused update >= 85% of copy bandwidth at
>= 2^24 elements, >= 3x eager, not slower than torch.compile; FdeHBO step <= 4 gradient
units (LeNet hyper-representation); and FdeHBO <= FMBO per step with a large y.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import inspect
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# ---------------------------------------------------------------- the problems of sections 4 and 5
# name -> (device, small) -> (problem, x, y, inner_batch, outer_batch).  A second variant of a
# problem (e.g. LeNet with declared features) is one more line here.

PROBLEMS = {
    "lenet_hr": lambda device, small: _bench("lenet_problem").make(batch=8 if small else 128, device=device),
    "mlp_large_y": lambda device, small: _bench("large_y").make(batch=16 if small else 256, device=device),
    # the same LeNet problem with the body declared as features (tb.Bilevel(..., features=phi))
    "lenet_hr_declared": lambda device, small: _bench("lenet_problem").make(batch=8 if small else 128,
                                                                            device=device, declared=True),
}

# ---------------------------------------------------------------- budget (seconds)

BUDGET_S = 420            # gpu.sh kills the process at 465 s; the call's limit is 480 s
SECTION_CAPS = {"env": 30, "memory": 40, "kernel_tests": 150, "bandwidth": 140, "step_costs": 100, "pair_modes": 90, "scale": 60,
                "fewshot": 60}
SECTION_MIN = {"env": 1, "memory": 10, "kernel_tests": 40, "bandwidth": 30, "step_costs": 20, "pair_modes": 15, "scale": 15,
               "fewshot": 10}
DRY_CAPS = {"env": 20, "memory": 30, "kernel_tests": 40, "bandwidth": 35, "step_costs": 25, "pair_modes": 20, "scale": 30,
            "fewshot": 25}
DRY_BUDGET_S = 150

GPU_SIZES = [2 ** k for k in (24, 26, 20, 22, 25, 21, 23)]   # most important first
DRY_SIZES = [2 ** 10, 2 ** 12]


def _bench(name):
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return importlib.import_module(name)


# ---------------------------------------------------------------- importing the package from a source tree

SHIM = r'''# written by bench/gpu.py: makes torchbilevel.kernels importable from the source tree at
# {root!r} (pyproject.toml maps its top-level kernels/ directory there) without installing it
import importlib.abc, importlib.machinery, importlib.util, os, sys

_ROOT = {root!r}


class _TBKernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchbilevel.kernels":
            d = os.path.join(_ROOT, "kernels")
            return importlib.util.spec_from_file_location(
                name, os.path.join(d, "__init__.py"), submodule_search_locations=[d])
        return None


sys.meta_path.insert(0, _TBKernelsFinder())
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
# chain to a sitecustomize further down sys.path, if the environment has one
_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.origin and os.path.dirname(os.path.abspath(_spec.origin)) != _here:
    _mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_mod)
'''


def ensure_importable(force_shim: bool = False) -> str:
    """Make ``import torchbilevel`` (and ``torchbilevel.kernels``) resolve to this tree, in
    this process and in the subprocesses it starts.  Returns how: "installed" or "shim"."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    def ours(mod, where):
        return os.path.realpath(mod.__file__).startswith(os.path.realpath(os.path.join(ROOT, where)) + os.sep)

    if not force_shim:
        try:
            tbk = importlib.import_module("torchbilevel.kernels")
            if ours(sys.modules["torchbilevel"], "torchbilevel") and ours(tbk, "kernels"):
                return "installed"      # this tree (an editable install, or the shim already active)
        except ImportError:
            pass
    shim_dir = tempfile.mkdtemp(prefix="tb_shim_")
    with open(os.path.join(shim_dir, "sitecustomize.py"), "w") as fh:
        fh.write(SHIM.format(root=ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join([shim_dir] + os.environ["PYTHONPATH"].split(os.pathsep))
    ns: dict = {"__file__": os.path.join(shim_dir, "sitecustomize.py")}
    exec(compile(SHIM.format(root=ROOT).split("# chain to")[0], "tb_shim", "exec"), ns)
    for m in [m for m in sys.modules if m == "torchbilevel" or m.startswith("torchbilevel.")]:
        del sys.modules[m]
    importlib.invalidate_caches()
    tbk = importlib.import_module("torchbilevel.kernels")
    if not (ours(sys.modules["torchbilevel"], "torchbilevel") and ours(tbk, "kernels")):
        raise ImportError(f"torchbilevel resolves to {sys.modules['torchbilevel'].__file__} and "
                          f"{tbk.__file__}, not to this tree {ROOT}")
    return "shim"


# ---------------------------------------------------------------- helpers

def _call_compat(fn, *args, **kw):
    """Call fn dropping keyword arguments it does not take (bench_kernels lost its ``fd``)."""
    params = inspect.signature(fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        kw = {k: v for k, v in kw.items() if k in params}
    return fn(*args, **kw)


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


class Run:
    """Budget, results and the JSON file."""

    def __init__(self, out_dir: str, dry: bool, budget: float):
        self.t0 = time.monotonic()
        self.budget = budget
        self.dry = dry
        self.path = os.path.join(out_dir, "gpu_results.json")
        os.makedirs(out_dir, exist_ok=True)
        self.data = {"schema": 1, "mode": "cpu-dry-run" if dry else "gpu",
                     "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                     "budget_s": budget, "error": None, "sections": {}, "skipped": []}

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def write(self):
        self.data["wall_s"] = round(time.monotonic() - self.t0, 1)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.data, fh, indent=1, default=str)
        os.replace(tmp, self.path)

    def section(self, name, fn, caps, mins):
        cap = min(caps[name], self.left() - 5)
        if cap < mins.get(name, 1) * (0.2 if self.dry else 1):
            self.data["sections"][name] = {"status": "skipped",
                                           "reason": f"{self.left():.0f} s of the budget left, section needs "
                                                     f">= {mins.get(name, 1)} s"}
            self.data["skipped"].append(name)
            self.write()
            print(f"[gpu.py] {name}: skipped (budget)", flush=True)
            return
        print(f"[gpu.py] {name}: start, cap {cap:.0f} s, {self.left():.0f} s of the budget left", flush=True)
        self.data["sections"][name] = {"status": "running (did not finish: the process was stopped)"}
        self.write()
        t = time.monotonic()
        res = {"status": "ok"}
        try:
            res.update(fn(time.monotonic() + cap) or {})
        except Exception as e:  # noqa: BLE001 - record and go on to the next section
            res["status"] = "error"
            res["error"] = _err(e)
            res["traceback"] = traceback.format_exc()[-4000:]
        res["seconds"] = round(time.monotonic() - t, 1)
        self.data["sections"][name] = res
        if res.get("skipped_items"):
            self.data["skipped"].append(f"{name}: {len(res['skipped_items'])} item(s)")
        self.write()
        print(f"[gpu.py] {name}: {res['status']} in {res['seconds']} s", flush=True)


# ---------------------------------------------------------------- timing

def _cuda():
    import torch
    return torch.cuda.is_available()


def time_fn(fn, reps: int, warmup: int = 3, deadline: float = float("inf")) -> float:
    """Median seconds of fn(): CUDA events around each call on a GPU, process CPU time on CPU."""
    import torch
    for _ in range(warmup):
        fn()
    times = []
    if _cuda():
        torch.cuda.synchronize()
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
            if time.monotonic() > deadline and len(times) >= 3:
                break
    else:
        for _ in range(reps):
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
            if time.monotonic() > deadline and len(times) >= 1:
                break
    return statistics.median(times)


def measure_interleaved(fns: dict, repeats: int, warmup: int = 2, deadline: float = float("inf")):
    """Median seconds per row, every round timing each row once (CUDA events / CPU time);
    stops adding rounds at the deadline (at least one round)."""
    import torch
    cuda = _cuda()
    errors = {}
    for k, fn in list(fns.items()):
        try:
            for _ in range(warmup):
                fn()
        except Exception as e:  # noqa: BLE001 - a row that fails is dropped and reported
            errors[k] = _err(e)
    fns = {k: fn for k, fn in fns.items() if k not in errors}
    if cuda:
        torch.cuda.synchronize()
    times = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            if cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                times[k].append(s.elapsed_time(e) / 1e3)
            else:
                t = time.process_time()
                fn()
                times[k].append(time.process_time() - t)
        if time.monotonic() > deadline:
            break
    return {k: statistics.median(v) for k, v in times.items()}, r + 1, errors


# ---------------------------------------------------------------- 1. env

def section_env(run: Run, import_mode: str):
    def go(deadline):
        import torch
        env = {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
               "cuda_available": torch.cuda.is_available(), "torchbilevel_import": import_mode,
               "float32_matmul_precision": torch.get_float32_matmul_precision(),
               "torch_threads": torch.get_num_threads()}
        try:
            env["cudnn"] = torch.backends.cudnn.version()
        except Exception as e:  # noqa: BLE001
            env["cudnn"] = _err(e)
        try:
            import triton
            env["triton"] = triton.__version__
        except Exception as e:  # noqa: BLE001
            env["triton"] = None
            env["triton_error"] = _err(e)
        import torchbilevel
        import torchbilevel.kernels as K
        env["torchbilevel_file"] = torchbilevel.__file__
        env["kernels_file"] = K.__file__
        env["triton_available"] = K.triton_available()
        for mod in ("numpy", "pytest", "hypothesis"):
            try:
                env[mod] = importlib.import_module(mod).__version__
            except Exception:  # noqa: BLE001
                env[mod] = None
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env.update(gpu_name=p.name, gpu_capability=f"{p.major}.{p.minor}", gpu_memory_GiB=round(p.total_memory / 2**30, 1),
                       gpu_sms=p.multi_processor_count, gpu_count=torch.cuda.device_count())
            try:
                q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,clocks.sm,clocks.mem",
                                    "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
                env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
            except Exception as e:  # noqa: BLE001
                env["nvidia_smi"] = _err(e)
        try:
            q = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
            env["git_head"] = q.stdout.strip() or None
            q = subprocess.run(["git", "-C", ROOT, "status", "--porcelain"], capture_output=True, text=True, timeout=10)
            env["git_dirty_files"] = len(q.stdout.splitlines()) if q.returncode == 0 else None
        except Exception:  # noqa: BLE001
            env["git_head"] = None
        run.data["env"] = env
        return {"summary": {k: env.get(k) for k in ("torch", "torch_cuda", "triton", "gpu_name")}}
    return go


# ---------------------------------------------------------------- 2. kernel tests

_OUTCOME = re.compile(r"^(tests/\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")
_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)")


def section_kernel_tests(run: Run):
    def go(deadline):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        args = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "tests/test_kernels.py"]
        if run.dry:
            # CPU: the interpreted subset that exercises every kind of test (reference, Triton, padding)
            env["TB_TEST_DEVICE"] = "cpu"
            args += ["-k", "reference_outer or full_step or row_padded or projection_of_zero"]
        else:
            env["TB_TEST_DEVICE"] = "cuda"
        timeout = max(5.0, deadline - time.monotonic())
        t = time.monotonic()
        try:
            p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            out, rc, timed_out = p.stdout + p.stderr, p.returncode, False
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc, timed_out = None, True
        outcomes = {}
        for line in out.splitlines():
            m = _OUTCOME.match(line.strip())
            if m:
                outcomes[m.group(1)] = m.group(2)
        counts = {}
        for o in outcomes.values():
            counts[o.lower()] = counts.get(o.lower(), 0) + 1
        summary_line = next((ln for ln in reversed(out.splitlines()) if _SUMMARY.search(ln) and "==" in ln), None)
        res = {"command": shlex.join(["TB_TEST_DEVICE=" + env["TB_TEST_DEVICE"], "python3"] + args[1:]),
               "returncode": rc, "timed_out": timed_out, "seconds": round(time.monotonic() - t, 1),
               "counts": counts, "summary_line": summary_line,
               "failed": [k for k, o in outcomes.items() if o in ("FAILED", "ERROR")],
               "short_summary": [ln for ln in out.splitlines() if ln.startswith(("FAILED ", "ERROR "))][:50],
               "skipped_tests": [k for k, o in outcomes.items() if o == "SKIPPED"][:50],
               "log_tail": out[-6000:]}
        if timed_out or rc not in (0,):
            res["status"] = "partial" if timed_out else "failed"
        return res
    return go


# ---------------------------------------------------------------- 3. bandwidth sweep

def section_bandwidth(run: Run):
    def go(deadline):
        import torch
        BK = _bench("bench_kernels")
        try:   # one compiled graph per size (dynamic=False): allow all of them
            torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
            if hasattr(torch._dynamo.config, "recompile_limit"):
                torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
        except Exception:  # noqa: BLE001
            pass
        cuda = _cuda()
        sizes = DRY_SIZES if run.dry else GPU_SIZES
        extras = [] if run.dry else [(2 ** 24 + 1, "float32"), (2 ** 24, "bfloat16")]
        reps = 2 if run.dry else 25
        rows, skipped, built = [], [], {}

        def one(n, dtype_name):
            dtype = getattr(torch, dtype_name)
            if dtype_name not in built:
                built[dtype_name] = _call_compat(BK.variants, fd=False, dtype=dtype)
            fns = built[dtype_name]
            inputs = _call_compat(BK.make_inputs, n, fd=False, dtype=dtype)
            row = {"n": n, "dtype": dtype_name, "variants": list(fns)}
            t = time.monotonic()
            try:
                BK.check_agree(fns, inputs, dtype)       # also compiles / JITs every variant at this size
                row["agree"] = True
            except AssertionError as e:
                row["agree"] = False
                row["agree_error"] = _err(e)
            except Exception as e:  # noqa: BLE001 - a variant that does not run: drop it, time the others
                row["agree"] = None
                row["agree_error"] = _err(e)
                fns = dict(fns)
                for name in list(fns):
                    try:
                        fns[name](**inputs)
                    except Exception as e2:  # noqa: BLE001
                        row.setdefault("errors", {})[name] = _err(e2)
                        del fns[name]
                if "eager" not in fns:
                    raise
            row["first_call_s"] = round(time.monotonic() - t, 2)
            itemsize = torch.finfo(dtype).bits // 8
            n_bytes = _call_compat(BK.moved_elements, n, fd=False) * itemsize
            row["bytes_moved"] = n_bytes
            ms = {}
            for name, fn in fns.items():
                try:
                    ms[name] = 1e3 * time_fn(lambda f=fn: f(**inputs), reps, deadline=deadline)
                except Exception as e:  # noqa: BLE001
                    row.setdefault("errors", {})[name] = _err(e)
            del inputs
            ms["copy"] = 1e3 * time_fn(BK.copy_call(n_bytes, dtype), reps, deadline=deadline)
            row["ms"] = ms
            row["GB_s"] = {k: n_bytes / (v / 1e3) / 1e9 for k, v in ms.items()}
            row["fraction_of_copy"] = {k: row["GB_s"][k] / row["GB_s"]["copy"] for k in ms if k != "copy"}
            if "triton" in ms:
                row["eager_over_triton"] = ms["eager"] / ms["triton"]
                if "compile" in ms:
                    row["compile_over_triton"] = ms["compile"] / ms["triton"]
            if "compile" in ms:
                row["eager_over_compile"] = ms["eager"] / ms["compile"]
            if cuda:
                torch.cuda.empty_cache()
            return row

        todo = [(n, "float32") for n in sizes] + extras
        for i, (n, dt) in enumerate(todo):
            if time.monotonic() > deadline - (3 if run.dry else 8):
                skipped += [f"n={m} {d}" for m, d in todo[i:]]
                break
            try:
                rows.append(one(n, dt))
            except Exception as e:  # noqa: BLE001
                rows.append({"n": n, "dtype": dt, "error": _err(e)})
            r = rows[-1]
            print(f"[gpu.py]   n={n} {dt}: " + "  ".join(f"{k}={v:.3f}ms" for k, v in r.get("ms", {}).items()),
                  flush=True)
        rows.sort(key=lambda r: (r["dtype"], r["n"]))
        res = {"device": "cuda" if cuda else "cpu", "reps_per_cell": reps, "rows": rows, "skipped_items": skipped,
               "note": "bytes moved = the fused step's minimum traffic (bench/bench_kernels.py moved_elements); "
                       "copy = dst.copy_(src) of the same bytes; inputs at 2^20 (~100 MB) partly fit the 60 MB L2"}
        if skipped:
            res["status"] = "partial"
        return res
    return go


# ---------------------------------------------------------------- 4. step costs

def section_memory(run: Run):
    """Peak memory per method in bytes per parameter at world size 1 (issue 25): the state
    and what one step adds above it, bench/memory_methods.py's rows (CUDA: peak allocated
    bytes; dry run: the CPU dispatch tracker on a tiny model)."""
    def go(deadline):
        MM = _bench("memory_methods")
        device = "cuda" if _cuda() else "cpu"
        size = dict(width=64, blocks=2, classes=10, batch=16) if run.dry else dict(width=2048, blocks=10,
                                                                                   classes=1000, batch=64)
        # y = the head, then y = every weight (LLM data reweighting's shape); plain and donated steps
        return {"device": device, "model": size, "rows": MM.rows(device=device, **size),
                "rows_y_every_weight": MM.rows(device=device, split="all", **size)}
    return go


def section_step_costs(run: Run):
    def go(deadline):
        import torch
        from torch.func import grad
        SC = _bench("step_cost")
        device = "cuda" if _cuda() else "cpu"
        repeats = 2 if run.dry else 15
        out, skipped = {}, []
        names = list(PROBLEMS)
        for i, pname in enumerate(names):
            share = (deadline - time.monotonic()) / (len(names) - i)
            if share < (2 if run.dry else 10):
                skipped += names[i:]
                break
            p_deadline = time.monotonic() + share
            try:
                problem, x, y, ib, ob = PROBLEMS[pname](device, run.dry)
                SC.ib, SC.ob = ib, ob              # step_cost.methods reads its batches from module globals
                fns = {"grad(g, argnums=(0,1))": lambda: grad(problem.inner, argnums=(0, 1))(x, y, ib)}
                fns.update(_call_compat(SC.methods, problem, x, y, device, ib=ib, ob=ob,
                                        inner_batch=ib, outer_batch=ob))
                sec, rounds, errors = measure_interleaved(fns, repeats, deadline=p_deadline)
                unit = sec["grad(g, argnums=(0,1))"]
                rows = []
                for name, s in sec.items():
                    row = {"method": name, "ms": 1e3 * s, "units": s / unit}
                    if device == "cuda" and time.monotonic() < p_deadline + 5:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        fns[name]()
                        torch.cuda.synchronize()
                        row["peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
                    rows.append(row)
                out[pname] = {"numel_x": sum(t.numel() for t in x.values()),
                              "numel_y": sum(t.numel() for t in y.values()), "rounds": rounds, "rows": rows,
                              "row_errors": errors}
            except Exception as e:  # noqa: BLE001
                out[pname] = {"error": _err(e), "traceback": traceback.format_exc()[-3000:]}
            print(f"[gpu.py]   {pname}: done", flush=True)
        res = {"device": device, "unit": "one torch.func grad(g, argnums=(0, 1)) at the same point",
               "timing": "CUDA events, interleaved rounds, medians" if device == "cuda" else "process CPU time",
               "problems": out, "skipped_items": skipped}
        if skipped or any("error" in v for v in out.values()):
            res["status"] = "partial"
        return res
    return go


# ---------------------------------------------------------------- 5. pair modes

def section_pair_modes(run: Run):
    def go(deadline):
        LY = _bench("large_y")
        device = "cuda" if _cuda() else "cpu"
        repeats = 2 if run.dry else 15
        out, skipped = {}, []
        names = list(PROBLEMS)
        for i, pname in enumerate(names):
            share = (deadline - time.monotonic()) / (len(names) - i)
            if share < (2 if run.dry else 8):
                skipped += names[i:]
                break
            p_deadline = time.monotonic() + share

            row_errors = {}

            def measure(fns, reps, d=p_deadline, errs=row_errors):
                sec, rounds, e = measure_interleaved(fns, reps, deadline=d)
                errs.update(e)
                errs["_rounds"] = rounds
                return sec
            try:
                out[pname] = LY.run_rows(*PROBLEMS[pname](device, run.dry), repeats=repeats, measure=measure,
                                         check=run.dry)
                out[pname]["rounds"] = row_errors.pop("_rounds", None)
                out[pname]["row_errors"] = row_errors
            except Exception as e:  # noqa: BLE001
                out[pname] = {"error": _err(e), "traceback": traceback.format_exc()[-3000:]}
            print(f"[gpu.py]   {pname}: done", flush=True)
        res = {"device": device, "problems": out, "skipped_items": skipped}
        if skipped or any("error" in v for v in out.values()):
            res["status"] = "partial"
        return res
    return go


# ---------------------------------------------------------------- 6. scale: SDPA and FSDP2 (world size 1)

def section_scale(run: Run):
    def go(deadline):
        device = "cuda" if _cuda() else "cpu"
        return {"device": device, "rows": _bench("scale_rows").rows(device, run.dry, deadline)}
# ---------------------------------------------------------------- 6. few-shot meta-gradient (issue 18)

def section_fewshot(run: Run):
    """tb.over_tasks loop vs vmap (and the hand-written loop / torch.func vmap) on the
    meta-gradient of bench/fewshot_cost.py: CNN4 width 32, 5-way 5-shot, 15 queries,
    16 tasks, ITD(10) on the head; on CUDA vmap is expected to win (the rule of mode="auto")."""
    def go(deadline):
        import torchbilevel as tb
        FC = _bench("fewshot_cost")
        device = "cuda" if _cuda() else "cpu"
        width, tasks = (4, 2) if run.dry else (32, FC.TASKS)
        model, x, ys, support, query = FC.setup(width, device, tasks)
        hg = tb.hypergrad(FC.anil_problem(model, FC.REG), tb.itd(FC.STEPS, FC.LR))
        hand_vmap = FC.func_vmap(model)
        fns = {"hand-written loop": lambda: FC.plain_loop(model, x, support, query),
               "hand-written torch.func vmap": lambda: hand_vmap(x, support, query),
               "over_tasks loop": lambda: tb.over_tasks(hg, "loop")(x, ys, support, query),
               "over_tasks vmap": lambda: tb.over_tasks(hg, "vmap")(x, ys, support, query),
               "over_tasks auto": lambda: tb.over_tasks(hg, "auto")(x, ys, support, query)}
        sec, rounds, errors = measure_interleaved(fns, 2 if run.dry else 10, deadline=deadline)
        rows = [{"case": k, "ms": 1e3 * v, "vs_loop": v / sec["over_tasks loop"]} for k, v in sec.items()]
        return {"device": device, "width": width, "tasks": tasks, "rounds": rounds, "rows": rows,
                "row_errors": errors}
    return go


# ---------------------------------------------------------------- targets and summary

def targets(data) -> dict:
    t = {}
    bw = data["sections"].get("bandwidth", {})
    big = [r for r in bw.get("rows", []) if r.get("dtype") == "float32" and r.get("n", 0) >= 2 ** 24
           and "ms" in r and "triton" in r["ms"] and r["n"] & (r["n"] - 1) == 0]
    if big:
        frac = min(r["fraction_of_copy"]["triton"] for r in big)
        eager = min(r["eager_over_triton"] for r in big)
        t["fused_update_fraction_of_copy_at_ge_2^24"] = {"min": frac, "target": 0.85, "met": frac >= 0.85}
        t["fused_update_speedup_over_eager_at_ge_2^24"] = {"min": eager, "target": 3.0, "met": eager >= 3.0}
        comp = [r["compile_over_triton"] for r in big if "compile_over_triton" in r]
        if comp:
            t["fused_update_vs_torch_compile_at_ge_2^24"] = {"min_compile_over_triton": min(comp), "target": 1.0,
                                                             "met": min(comp) >= 1.0}
    sc = data["sections"].get("step_costs", {}).get("problems", {})

    def units(p, prefix):
        for r in sc.get(p, {}).get("rows", []):
            if r["method"].startswith(prefix):
                return r["units"]
        return None
    fd = units("lenet_hr", "FdeHBO step (default")
    if fd is not None:
        t["fdehbo_step_units_lenet_hr"] = {"units": fd, "target": 4.0, "met": fd <= 4.0}
    fdl, fml = units("mlp_large_y", "FdeHBO step (default"), units("mlp_large_y", "FMBO step")
    if fdl is not None and fml is not None:
        t["fdehbo_over_fmbo_large_y"] = {"ratio": fdl / fml, "target": 1.0, "met": fdl <= fml}
    return t


def print_summary(data):
    print("\n==== bench/gpu.py summary ====")
    env = data.get("env", {})
    print(f"mode={data['mode']}  torch={env.get('torch')}  cuda={env.get('torch_cuda')}  triton={env.get('triton')}  "
          f"gpu={env.get('gpu_name')}  wall={data.get('wall_s')} s  skipped={data.get('skipped')}")
    for name, s in data["sections"].items():
        print(f"- {name}: {s.get('status')} ({s.get('seconds', 0)} s){'  ' + s['error'] if 'error' in s else ''}")
    kt = data["sections"].get("kernel_tests", {})
    if "counts" in kt:
        print(f"kernel tests: {kt['counts']}  rc={kt.get('returncode')}  failed={kt.get('failed')[:5]}")
    bw = data["sections"].get("bandwidth", {})
    if bw.get("rows"):
        print("| n | dtype | " + " | ".join(f"{k} ms" for k in bw["rows"][0].get("ms", {})) + " | x/copy |")
        for r in bw["rows"]:
            if "ms" in r:
                fr = " ".join(f"{k}={v:.2f}" for k, v in r["fraction_of_copy"].items())
                print(f"| {r['n']} | {r['dtype']} | " + " | ".join(f"{v:.3f}" for v in r["ms"].values()) + f" | {fr} |")
    mem = data["sections"].get("memory", {})
    for r in mem.get("rows", []) + mem.get("rows_y_every_weight", []):
        print(f"memory {r['method'][:36]:36s} donate={str(r.get('donate', False)):5s} state {r['state_bytes_per_param']:6.1f} B/param, step peak "
              f"{r['step_peak_bytes_per_param']:6.1f} B/param ({r['step_peak_x_param_bytes']:.1f}x parameters)")
    for pname, p in data["sections"].get("step_costs", {}).get("problems", {}).items():
        if "rows" in p:
            print(f"step costs, {pname} (numel x={p['numel_x']}, y={p['numel_y']}):")
            for r in p["rows"]:
                print(f"  {r['method']:52s} {r['ms']:9.3f} ms {r['units']:7.2f} units")
    for k, v in data.get("targets", {}).items():
        print(f"target {k}: {v}")


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="every section at tiny sizes on CPU (no CUDA needed)")
    ap.add_argument("--out", default=os.environ.get("OUT", "./out"), help="output folder (default $OUT or ./out)")
    ap.add_argument("--budget", type=float, default=None, help=f"seconds for all sections (default {BUDGET_S}; "
                    "dry run 150)")
    ap.add_argument("--sections", default=None, help="comma-separated subset of " + ",".join(SECTION_CAPS))
    ap.add_argument("--force-shim", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    dry = a.cpu_dry_run
    run = Run(a.out, dry, a.budget or (DRY_BUDGET_S if dry else BUDGET_S))
    os.environ.pop("TRITON_INTERPRET", None) if not dry else None
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        run.data["error"] = f"torch does not import: {_err(e)}"
        run.write()
        print(run.data["error"])
        return 3
    if dry:
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        run.data["error"] = (f"torch {torch.__version__} sees no CUDA device (CPU-only build or no GPU): "
                             "nothing measured; run with --cpu-dry-run for the CPU parts")
        run.write()
        print(run.data["error"])
        return 3
    try:
        import_mode = ensure_importable(force_shim=a.force_shim)
    except Exception as e:  # noqa: BLE001
        run.data["error"] = f"torchbilevel does not import from {ROOT}: {_err(e)}"
        run.write()
        print(run.data["error"])
        return 4
    caps, mins = (DRY_CAPS if dry else SECTION_CAPS), SECTION_MIN
    chosen = a.sections.split(",") if a.sections else list(SECTION_CAPS)
    sections = {"env": section_env(run, import_mode), "memory": section_memory(run),
                "kernel_tests": section_kernel_tests(run),
                "bandwidth": section_bandwidth(run), "step_costs": section_step_costs(run),
                "pair_modes": section_pair_modes(run), "scale": section_scale(run),
                "fewshot": section_fewshot(run)}
    for name in SECTION_CAPS:
        if name not in chosen:
            run.data["sections"][name] = {"status": "skipped", "reason": "not selected (--sections)"}
            continue
        run.section(name, sections[name], caps, mins)
    run.data["targets"] = targets(run.data)
    run.data["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    run.write()
    print_summary(run.data)
    print(f"\nwrote {run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
