"""What every part of the study shares: the config, the models, this process's examples.

`Study` loads the models and THIS PROCESS's share of the test examples (each process reads
only its own rows: `diffjax.parallel.share`), derives one key per example from its id
(`example_keys(key(seed), id)`: every number is independent of batch size, batch order,
device and process count), builds the defended models and the attacks from the config,
and runs batched functions over its examples on the data mesh (`map_batches`, padded and
masked, agreed with the other processes). `gather` assembles every process's rows in id
order. The measurements live in the modules named after the claims they serve
(`robustness`, `distances`, `randomness`, `compression`, `audit`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from diffjax import _checks, attacks, data, diffusion, parallel, pretrained, protocols, randomness
from diffjax.attacks.cascade import ATTACK_NAMES, Cascade
from diffjax.defense import Defense, undefended
from diffjax.study.workdir import Workdir

__all__ = ["Study", "as_list", "methods_of", "validate_config", "is_designed_purifier",
           "UNDEFENDED"]

UNDEFENDED = "none"  # the undefended classifier, where a method name is expected


def is_designed_purifier(method: str) -> bool:
    """True when `method` names a deterministic purifier checkpoint (role "purifier", a
    shipped name such as "digits_purifier" or a model directory) rather than a diffusion
    method: `Study.defense` then attacks that purifier, with t* ignored."""
    if method == UNDEFENDED or method in diffusion.METHODS:
        return False
    try:
        return pretrained.verify(method).get("role") == "purifier"
    except (FileNotFoundError, ValueError):
        return False


def _check_method(method: str, field: str) -> None:
    if not is_designed_purifier(method):
        _checks.check_choice(method, field, diffusion.METHODS)


def as_list(value, cast=str) -> list:
    """A config list given as a sequence or a comma-separated string ("ddpm,sde")."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    try:
        return [cast(v) for v in value]
    except (TypeError, ValueError) as e:
        raise ValueError(f"expected a comma-separated list; got {value!r} ({e})") from e


def methods_of(config) -> list[str]:
    return as_list(config.methods)


def _check_attack(a, name: str) -> None:
    for spec in as_list(a.cascade):
        _checks.check_choice(spec, f"{name}.cascade", ATTACK_NAMES)
    _checks.check_choice(a.norm, f"{name}.norm", ("linf", "l2"))
    _checks.check_number(a.eps, f"{name}.eps", lo=0.0, hi=1.0 if a.norm == "linf" else None)
    _checks.check_number(a.step_size, f"{name}.step_size", lo=0.0, lo_open=True)
    _checks.check_int(a.steps, f"{name}.steps", lo=1)
    _checks.check_int(a.targets, f"{name}.targets", lo=1)
    _checks.check_int(a.restarts, f"{name}.restarts", lo=1)
    _checks.check_int(a.chunk, f"{name}.chunk", lo=0)
    _checks.check_choice(a.gradient, f"{name}.gradient", ("full", "bpda"))
    _checks.check_choice(a.loss, f"{name}.loss", ("ce", "margin", "dlr"))


def validate_config(config) -> None:
    """Raises a one-line ValueError for a config that cannot run (checked before any work)."""
    info = data.info(config.dataset)
    split = config.get("split") or ""
    if split:
        _checks.check_choice(split, "config.split", tuple(info.split_sizes))
    methods = methods_of(config)
    if not methods:
        _checks.fail("config.methods", "at least one purifier method", config.methods)
    for m in methods:
        _check_method(m, "config.methods")
    for m in as_list(config.compression.methods):
        _checks.check_choice(m, "config.compression.methods", diffusion.METHODS)
    _check_attack(config.attack, "config.attack")
    _check_attack(config.attack_undefended, "config.attack_undefended")
    _checks.check_int(config.attack.eot, "config.attack.eot", lo=1)
    _checks.check_int(config.num_examples, "config.num_examples", lo=2)
    _checks.check_int(config.batch_size, "config.batch_size", lo=1)
    if config.batch_size % jax.process_count():
        _checks.fail("config.batch_size", f"a multiple of the process count "
                     f"{jax.process_count()}", config.batch_size)
    _checks.check_int(config.purifier.t_star, "config.purifier.t_star", lo=1)
    _checks.check_int(config.purifier.num_steps, "config.purifier.num_steps", lo=1,
                      hi=config.purifier.t_star)
    _checks.check_choice(config.purifier.clip_gradient, "config.purifier.clip_gradient",
                         diffusion.CLIP_GRADIENTS)
    diffusion.samplers.remat_mode(config.purifier.get("remat", True), "config.purifier.remat")
    try:
        t_stars = as_list(config.compression.t_stars, int)
    except ValueError as e:
        raise ValueError(f"config.compression.t_stars: {e}") from e
    for t in t_stars:
        _checks.check_int(t, "config.compression.t_stars[i]", lo=1)
    c = config.compression
    _checks.check_choice(c.estimator, "config.compression.estimator",
                         ("auto", "exact", "hutchinson"))
    _checks.check_choice(c.spectrum, "config.compression.spectrum", ("exact", "top_k", "none"))
    _checks.check_choice(c.ad_mode, "config.compression.ad_mode", ("forward", "reverse"))
    _checks.check_int(c.num_probes, "config.compression.num_probes", lo=2)
    _checks.check_int(c.top_k, "config.compression.top_k", lo=1)
    if c.get("lanczos_iterations"):
        _checks.check_int(c.lanczos_iterations, "config.compression.lanczos_iterations",
                          lo=int(c.top_k))
    _checks.check_number(c.min_clean_fraction, "config.compression.min_clean_fraction",
                         lo=0.0, hi=1.0)
    _checks.check_int(config.eval_draws, "config.eval_draws", lo=1)
    if config.get("concurrent_parts") is not None:
        _checks.check_int(config.concurrent_parts, "config.concurrent_parts", lo=1)
    _checks.check_int(config.fid_reference_examples, "config.fid_reference_examples", lo=2)
    for m in as_list(config.audit.methods):
        _check_method(m, "config.audit.methods")


@dataclasses.dataclass
class Study:
    """Everything the parts share (module docstring)."""

    config: object
    workdir: Workdir
    log: Callable[[str], None] = print

    def __post_init__(self):
        cfg = self.config
        self.classifier = _load(cfg.classifier, "classifier", "config.classifier")
        self.diffusion_model = _load(cfg.diffusion, "diffusion", "config.diffusion")
        self.schedule = self.diffusion_model.schedule()
        self.info = data.info(cfg.dataset)
        splits = self.info.split_sizes
        self.split = cfg.get("split") or ("test" if "test" in splits else "validation")
        self.num_examples = min(int(cfg.num_examples), splits[self.split])
        self.ids = parallel.share(self.num_examples)
        test = data.load_arrays(cfg.dataset, self.split, data_dir=cfg.get("data_dir"),
                                ids=self.ids, synthetic=bool(cfg.get("synthetic_data")),
                                seed=int(cfg.seed))
        self.x, self.y = test.images, test.labels
        if jax.process_count() > 1:
            self.log(f"process {jax.process_index()} reads its share of {self.split}: "
                     f"examples {self.ids[0]}..{self.ids[-1]} of {self.num_examples}")
        self.root = jax.random.key(int(cfg.seed))
        self.keys = np.asarray(jax.random.key_data(
            randomness.example_keys(self.root, jnp.asarray(self.ids))))
        self.mesh = parallel.data_mesh()
        self.batch_size = int(cfg.batch_size)
        self.local_batch = parallel.local_batch_size(self.batch_size)
        self.plain = undefended(self.classifier.logits_fn)
        self._purifiers: dict = {}  # designed purifiers' purify_fn, loaded once
        self._check_workdir_config()

    # The config fields every saved part depends on. Part names carry the method, t*,
    # stream and example count, not these: a work directory holds one setting of them.
    PART_FIELDS = ("dataset", "split", "synthetic_data", "diffusion", "classifier", "seed",
                   "num_examples", "eval_draws", "purifier", "attack", "attack_undefended")

    def _check_workdir_config(self) -> None:
        """Records PART_FIELDS in the work directory on first use; later runs must match
        them (else their parts would be loaded under another setting)."""
        cfg = self.config
        now = {k: (cfg[k].to_dict() if hasattr(cfg[k], "to_dict") else cfg[k])
               for k in self.PART_FIELDS if k in cfg}
        now = json.loads(json.dumps(now, default=str))
        path = self.workdir.path / "parts" / "_study_config.json"
        old = self.workdir.read_agreed(path)
        if old is None:
            self.workdir.write(path, json.dumps(now, indent=2, sort_keys=True).encode())
            return
        old = json.loads(old)
        diff = sorted(_differences(old, now))
        if diff:
            shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:6])
            raise ValueError(
                f"workdir: {self.workdir.path} holds parts computed under another setting "
                f"({shown}{'; ...' if len(diff) > 6 else ''}); its parts would be reused "
                "as if they were this setting's. Use a new --workdir, or delete "
                f"{self.workdir.path / 'parts'} to recompute everything")

    # -- models and attacks --------------------------------------------------------------

    def defense(self, method: str, t_star: int | None = None,
                clip_gradient: str | None = None) -> Defense:
        """The defended model of `method` at `t_star` (default the config's), the
        undefended classifier for `UNDEFENDED`, a designed purifier's own (t* and
        `clip_gradient` ignored: `is_designed_purifier`)."""
        if method == UNDEFENDED:
            return self.plain
        if is_designed_purifier(method):
            if method not in self._purifiers:
                self._purifiers[method] = _load(method, "purifier", "method").purify_fn
            return Defense(self._purifiers[method], self.classifier.logits_fn)
        p = self.config.purifier
        t_star = int(t_star or p.t_star)
        steps = min(int(p.num_steps), t_star)
        model_cfg = self.diffusion_model.config
        size = int(p.get("resolution") or model_cfg.get("image_size",
                                                        model_cfg.get("resolution")) or 0)
        # Padded with identity steps to the configured step count: every (method, t*) of
        # the study runs the same compiled programs (see diffusion.make_chain).
        purifier = diffusion.make_purifier(
            self.diffusion_model.eps_fn, schedule=self.schedule, t_star=t_star,
            method=method, num_steps=steps, length=max(int(p.num_steps), steps),
            remat=p.get("remat", True), resolution=size or None,
            clip_gradient=clip_gradient or p.clip_gradient)
        return Defense(purifier, self.classifier.logits_fn)

    def gradient(self, kind: str | None = None):
        a = self.config.attack
        batch = int(a.get("eot_batch_size") or 0) or None
        return attacks.Gradient(kind or a.gradient, eot_batch_size=batch)

    def cascade(self, method: str, *, spec=None, steps=None, eps=None, gradient=None,
                chunk=None) -> Cascade:
        """The attack of `method`: the config's `attack` (or `attack_undefended` for the
        undefended classifier), with optional overrides (the audit's variants)."""
        a = self.config.attack_undefended if method == UNDEFENDED else self.config.attack
        steps = int(steps or a.steps)
        c = int(a.chunk) if chunk is None else chunk
        eps = float(a.eps if eps is None else eps)
        return Cascade.from_spec(
            spec or a.cascade, norm=a.norm, eps=eps, steps=steps,
            step_size=float(a.step_size) * eps / float(a.eps),  # PGD's step scales with eps
            gradient=gradient or self.gradient(a.gradient),
            targets=int(a.targets), restarts=int(a.restarts), loss=a.loss,
            random_start=bool(a.random_start), queries=int(a.get("queries") or 0) or None,
            chunk=c or None, early_exit=bool(a.early_exit),
            shared_oracle=self.shared_oracle)

    @property
    def shared_oracle(self) -> bool:
        """Gradients through the purifier from one shared program (`config.shared_oracle`)."""
        return bool(self.config.get("shared_oracle", False))

    def protocols(self) -> dict[str, protocols.Protocol]:
        m = int(self.config.eval_draws)
        return {"fixed": protocols.Fixed(), "transfer": protocols.Transfer(eval_draws=m),
                "independent": protocols.Independent(eot=int(self.config.attack.eot),
                                                     eval_draws=m)}

    # -- examples ------------------------------------------------------------------------

    def rows(self, n: int | None = None) -> np.ndarray:
        """This process's rows (positions in `self.x`) of the first `n` examples."""
        return np.arange(len(self.ids)) if n is None else np.flatnonzero(self.ids < n)

    def key_array(self, rows) -> jax.Array:
        return jax.random.wrap_key_data(self.keys[rows])

    def map_batches(self, fn: Callable, *arrays) -> dict:
        """`fn(*placed)` over this process's `arrays` (rows aligned) in batches of the
        global batch size; returns `fn`'s dict of per-example outputs, this process's rows.

        Every process runs the same number of batches (agreed), padding where it has fewer
        rows, so `fn` may be any collective jitted program.
        """
        n = len(arrays[0])
        num = parallel.agree_max(-(-n // self.local_batch))
        outs = []
        for b in range(num):
            sl = slice(b * self.local_batch, min((b + 1) * self.local_batch, n))
            chunk = [a[sl] if len(a[sl]) else a[:1] for a in arrays] if n else [
                np.zeros((1, *np.shape(a)[1:]), np.asarray(a).dtype) for a in arrays]
            placed = parallel.put_local(self.mesh, *chunk, rows=self.local_batch)[:-1]
            got = fn(*placed)
            k = max(sl.stop - sl.start, 0)
            outs.append({name: parallel.local_rows(v)[:k] for name, v in got.items()})
        if not outs:
            return {}
        return {name: np.concatenate([o[name] for o in outs]) for name in outs[0]}

    def gather(self, tree: dict) -> dict:
        """Every process's rows of each array, in example-id order (on every process)."""
        return {k: parallel.gather_rows(v) for k, v in tree.items()}


def _differences(old, new, prefix=""):
    """(dotted key, old, new) for every leaf that differs between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            yield from _differences(old.get(k), new.get(k), f"{prefix}{k}.")
    elif old != new:
        yield prefix.rstrip("."), old, new


def _load(name: str, role: str, field: str):
    model = pretrained.load(name)
    if model.role != role:
        raise ValueError(f"{field}: {name!r} is a {model.role}, expected a {role}")
    return model
