"""Pictures of energy descent: landscapes, trajectories, energy traces and the norm sweep.

matplotlib is the ``[viz]`` extra and is imported only when a plotting function runs, so
``import energy_attn`` (and ``import energy_attn.viz``) never imports it.

* :func:`simulate_and_plot_patterns`: the blog's flatland figure (2-D patterns).
* :func:`plot_energy_trace`: energy per descent step, one line per optimizer.
* :func:`norm_sweep` / :func:`plot_norm_sweep`: how far bare self-attention moves patterns as a
  function of ``d_k`` and the scale.
* :func:`toy_patterns` and :func:`write_gallery`: the blog's figures as PNG files (what
  ``energy-attn landscape`` writes).
"""

from .gallery import toy_patterns, write_gallery
from .landscape import plot_energy_trace, simulate_and_plot_patterns
from .sweep import norm_sweep, plot_norm_sweep

__all__ = [
    "norm_sweep",
    "plot_energy_trace",
    "plot_norm_sweep",
    "simulate_and_plot_patterns",
    "toy_patterns",
    "write_gallery",
]
