"""A screen for issue #17's next step: ScaledLoRSum with LoRSum's per-layer step normalisation.

``normalize_step`` (optim/step_normalization.py) is an option of LoRSum only; this wraps ScaledLoRSum with the
same functions (the layer's lr from its statistics, the proximal weight kept at η·λ0, ``step()``'s finish) to
try it on one point of the defaults sweep before building it into the class and sweeping it. One run per
call, printing the sweep's JSON row (not appended to docs/defaults_sweep.jsonl):

    python tools/normalized_scaled_screen.py lm_attn 3e-4 0
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import defaults_sweep as ds  # noqa: E402

from lorsum_kernels import optim as lkopt  # noqa: E402
from lorsum_kernels.optim import ScaledLoRSum  # noqa: E402
from lorsum_kernels.optim import step_normalization as sn  # noqa: E402


class NormScaled(ScaledLoRSum):
    """ScaledLoRSum at its class defaults, each layer's step normalised as LoRSum(normalize_step=True)'s."""

    _state_for_step = sn.FINISHED_IN_STEP

    def __init__(self, model, **kw):
        super().__init__(model, **kw)
        for g in self.param_groups:
            g["normalize_step"], g["normalize_beta"] = True, 0.999

    def _init_layer_state(self, layer, group, generator):
        st = super()._init_layer_state(layer, group, generator)
        st.update(sn.initial_state(self._state_dtype(layer), layer.A.device))
        return st

    def _method_step(self, group, A, B, X, S, state, grads, reduce, backend):
        inner = {k: v for k, v in state.items() if k not in sn.STATE_KEYS}

        def step_at(lr):
            ridge = float(group["lr"]) / lr
            g2 = dict(group, lr=lr, lmbd=group["lmbd"] * ridge)
            return ScaledLoRSum._method_step(self, g2, A, B, X, S, dict(inner), grads, reduce, backend)
        return sn.step_at_layer_lr(step_at, A, B, group["lr"], state)


def main(argv=None) -> None:
    task, lr, seed = (argv or sys.argv[1:])[:3]
    lkopt.OPTIMIZERS["norm_scaled"] = NormScaled
    ds.GRID["norm_scaled"] = {"lrs": [], "kwargs": {}}
    print(json.dumps(ds.run_point(task, "norm_scaled", float(lr), int(seed))), flush=True)


if __name__ == "__main__":
    main()
