"""What every experiment script shares: one-line errors, timestamped progress lines, the
study scripts' and the training scripts' flags, and the training scripts' main and export."""

import contextlib
import importlib.util
import os
import pathlib
import re
import shlex
import sys
import time

from absl import flags, logging

_START = time.time()

# Accelerator plugins: where one is installed, XLA's defaults are left alone.
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "libtpu")


def compile_faster_on_cpu() -> bool:
    """Compiles the scripts' programs with LLVM optimisation level 1 on a CPU-only machine.

    Most of a CPU study is XLA compiling its programs; at level 1 the quick study's
    programs compiled about 20% faster than at XLA's default (2), ran as fast, and every
    number came out bit-identical (BENCHMARKS.md, "Compiling the study"). A level in the
    user's XLA_FLAGS wins, and with an accelerator plugin installed (or JAX_PLATFORMS
    naming an accelerator) nothing changes. Takes effect only before JAX starts its
    backend: `define_study_flags`, which every study script calls at import, calls it
    (the benchmarks do not: they time XLA's defaults). Returns whether it set the level.
    """
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" in xla_flags or not _cpu_only():
        return False
    os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_backend_optimization_level=1".strip()
    return True


def _cpu_only() -> bool:
    """Whether JAX will run on the CPU alone: JAX_PLATFORMS is "cpu", or it is unset and no
    accelerator plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.strip().lower() == "cpu"
    return not any(importlib.util.find_spec(p) is not None for p in _ACCELERATOR_PLUGINS)


def keep_freed_memory_on_cpu() -> bool:
    """Makes glibc's malloc keep freed memory for reuse instead of unmapping it, in a CPU run.

    XLA:CPU allocates each program run's temporaries as one buffer (96 MB for the digits
    purifier's gradient at batch 50); glibc serves an allocation that large with a fresh
    `mmap` every time, so every run first pays page faults to zero it again. With mmap off
    for the heap (`M_MMAP_MAX=0`) and a 1 GB trim threshold, the freed buffer is reused:
    in alternating runs of one APGD attack in one process, 19-21% less wall time with the
    shared gradient oracle and in one program alike (BENCHMARKS.md, "Latest: one gradient
    program"). Allocation does not change what is computed. Only on Linux with glibc, on a
    CPU-only machine (as `compile_faster_on_cpu`), and not when the user's environment
    sets glibc's own `MALLOC_MMAP_MAX_` or `MALLOC_TRIM_THRESHOLD_`. Returns whether it
    changed malloc.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux") or any(
            k in os.environ for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    if not _cpu_only():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): leave it
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


# Errors that mean "the user asked for something that cannot run": print one line, exit 1.
# OSError: missing or unwritable paths, and a --config file ml_collections could not load
# (it raises a plain OSError, naming the path, when the config is first read).
USER_ERRORS = (ValueError, OSError, ModuleNotFoundError, KeyError)


def log(msg: str) -> None:
    """Prints one progress line with the elapsed time, flushed at once."""
    print(f"[{time.time() - _START:7.1f}s] {msg}", flush=True)


@contextlib.contextmanager
def one_line_errors():
    """Turns bad input (bad flags, missing files, unwritable dirs) into `error: ...`, exit 1.

    Work already finished is on disk (the scripts write each part as it completes), so
    nothing computed is lost; the message says what to change.
    """
    try:
        yield
    except USER_ERRORS as e:
        msg = one_line(e) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: finished parts are saved; rerun the same command to resume",
              file=sys.stderr, flush=True)
        sys.exit(130)


def one_line(e: BaseException) -> str:
    """An exception as one line; config_flags embeds a whole traceback in its messages."""
    msg = str(e).replace("\\n", " ").replace("\\'", "'")
    if "Traceback (most recent call last)" in msg:
        last = re.findall(r"\b\w+(?:Error|Exception): .*", msg)
        msg = msg.split("Traceback")[0] + (last[-1] if last else "")
    msg = " ".join(msg.split())
    if len(msg) > 1 and msg[0] == msg[-1] and msg[0] in "'\"":
        msg = msg[1:-1]
    return msg


def exit_with_flag_error(e: BaseException, argv) -> None:
    """Prints `error: ...` for a bad flag and exits 1; names an unknown config field (which
    ml_collections reports as a bare AttributeError/KeyError of the field's name)."""
    msg = one_line(e)
    if isinstance(e, (AttributeError, KeyError)):
        field = msg.strip("'\" ")
        named = [a.split("=")[0] for a in argv[1:]
                 if field and a.startswith("--") and a.split("=")[0].endswith("." + field)]
        if named:
            msg = (f"{named[0]}: no such config field {field!r}; the config file's "
                   "docstring and get_config() list the fields")
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def parse_flags(argv):
    """absl's flag parser (`app.run(main, flags_parser=parse_flags)`) with a one-line
    `error: ...` and exit 1 instead of a usage dump or a traceback."""
    try:
        rest = flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError) as e:
        exit_with_flag_error(e, argv)
    if len(rest) > 1:
        print(f"error: unexpected arguments {rest[1:]} (flags are --name=value)",
              file=sys.stderr, flush=True)
        sys.exit(1)
    return rest


def define_train_flags():
    """The training scripts' flags: ``--config``, ``--workdir``, ``--export_dir``,
    ``--progress`` (in that order)."""
    from ml_collections import config_flags

    return (config_flags.DEFINE_config_file("config", None,
                                            "A config file (experiments/configs)."),
            flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs."),
            flags.DEFINE_string("export_dir", "", "Write the trained EMA model here."),
            flags.DEFINE_bool("progress", True, "Show a progress bar."))


def script_command(module: str) -> str:
    """The command line that ran `module` (``python -m MODULE FLAGS...``), for metadata."""
    return shlex.join(["python", "-m", module, *sys.argv[1:]])


def export_ema(export_dir: str, module: str, config, model_cfg: dict, variables, metrics,
               *, schedule: dict | None = None, **meta):
    """Writes a trained model's EMA weights with `diffjax.pretrained.save`, the command,
    dataset, metrics, training config and seed in its metadata (plus `meta`); prints and
    returns the directory."""
    import jax

    from diffjax import pretrained

    out = pretrained.save(
        export_dir, kind=config.model.kind, config=model_cfg, variables=variables,
        name=pathlib.Path(export_dir).name, schedule=schedule,
        meta={"command": script_command(module), "dataset": config.dataset,
              "metrics": metrics, "train": config.train.to_dict(), **meta,
              "seed": config.seed, "params": "ema", "jax_version": jax.__version__})
    print(f"exported the EMA model to {out}")
    return out


def train_main(argv, run, config_holders, example_config: str) -> None:
    """The training scripts' `main`: checks the flags, runs `run(config, workdir,
    export_dir, progress)`, and ends bad input with one `error:` line (exit 1)."""
    config, workdir, export_dir, progress = config_holders
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {argv[1:]} (flags are --name=value)")
    if not workdir.value:
        sys.exit("error: --workdir is required (checkpoints go to WORKDIR/checkpoints)")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        if config.value is None:
            sys.exit(f"error: --config is required, e.g. --config={example_config}")
        run(config.value, workdir.value, export_dir.value, progress.value)
    except (ValueError, OSError, KeyError) as e:  # OSError: missing files, bad paths
        sys.exit(f"error: {one_line(e)}")


def define_study_flags(config_file: str = "experiments/configs/reproduce.py"):
    """--config (the study's config file; default `config_file`, the embedded default),
    --workdir, --distributed, --jax_cache: the flags every study script shares. Returns
    the holders. Also sets the scripts' CPU compile level (`compile_faster_on_cpu`) and
    malloc's reuse of freed memory (`keep_freed_memory_on_cpu`)."""
    from ml_collections import config_flags

    compile_faster_on_cpu()
    keep_freed_memory_on_cpu()
    try:  # with a default config file, overrides like --config.attack.steps apply at import
        config = config_flags.DEFINE_config_file(
            "config", config_file, "Study config file (variants after a colon, e.g. :quick).")
    except (AttributeError, KeyError, ValueError, TypeError) as e:
        exit_with_flag_error(e, sys.argv)
    workdir = flags.DEFINE_string("workdir", None, "Directory for results, local or gs://...; "
                                  "a rerun resumes. Shared by every study script.")
    distributed = flags.DEFINE_bool("distributed", False,
                                    "Call jax.distributed.initialize() (multi-host runs).")
    cache = flags.DEFINE_string(
        "jax_cache", "~/.cache/diffjax/jax_cache",
        "JAX's persistent compilation cache ('' to disable): compiling the study's programs "
        "is most of a CPU run's time, and a rerun or resume skips it.")
    return config, workdir, distributed, cache


def open_study(config, workdir: str | None, distributed: bool, jax_cache: str):
    """Initialises JAX (multi-host with `distributed`), validates the config, opens the
    work directory and loads the study's models and this process's examples."""
    import os

    import jax

    from diffjax import parallel
    from diffjax.study import Study, Workdir, validate_config

    parallel.initialize(distributed)
    if jax_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(jax_cache))
    if not workdir:
        raise ValueError("--workdir: required; e.g. --workdir=workdir/study")
    validate_config(config)
    fail_after = config.debug.fail_after_batches
    wd = Workdir(workdir, log=log, fail_after_batches=fail_after if fail_after > 0 else None)
    log(f"diffjax on {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es), workdir {wd.path}")
    return Study(config, wd, log)


def write_summary(study, name: str, summary) -> None:
    """Writes WORKDIR/<name>/summary.json (process 0) and says where."""
    path = study.workdir.path / name / "summary.json"
    study.workdir.write_json(path, summary)
    log(f"wrote {path}")
