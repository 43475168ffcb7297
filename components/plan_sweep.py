"""Component: the sweep's candidates, one per (method, rank, target preset), full fine-tuning once."""

from typing import List

from kfp import dsl

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def plan_sweep(methods: List[str], ranks: List[int], target_presets: List[str]) -> List[dict]:
    """Planned at run time, so the lists stay pipeline parameters; the loop over the result trains each candidate."""
    from kftune import steps
    from kftune.sweep import plan as sweep

    return steps.reports_errors(sweep.plan)(methods, ranks, target_presets)
