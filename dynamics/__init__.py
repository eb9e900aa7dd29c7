"""dpo-dynamics: exact simulation of last-layer DPO learning dynamics.

Im & Li, "Understanding the Learning Dynamics of Alignment with Human
Feedback", ICML 2024 (arXiv:2403.18742). The model and claims are stated and
derived in docs/theory.md.

Data flow: distribution → dynamics (population or empirical) → metrics.
"""
from .distributions import Components, GaussianPreference, diagonal_cov, isotropic_cov, priority_gap
from .priority import loss_series, predicted_loss_drop, priority_score  # covariance-aware (docs/theory.md §4.4)
from .empirical import METRICS, EmpiricalTrajectory, empirical_trajectory, flip_labels, trajectory_on_data
from .families import ELLIPTICAL_FAMILIES, EllipticalPreference, GaussianMixturePreference
from .fitting import BehaviorProperties, behavior_properties, fit_gaussian, ledoit_wolf_shrinkage
from .gaussian_integrals import sigmoid_family_expectations
from .head import Head
from .losses import LOSSES, expected_loss_terms, loss_fn, loss_grad_fn
from . import theory, transforms
from .engine import FallbackWarning, trajectories  # one entry point per layer (implementation=)
from .population import (
    PopulationTrajectory,
    gaussian_accuracy,
    training_components,
    population_gradient,
    population_loss,
    population_metrics,
    population_trajectory,
)

__version__ = "0.1.0"

__all__ = [
    "GaussianPreference", "Components", "Head", "isotropic_cov", "diagonal_cov", "priority_gap",
    "LOSSES", "loss_fn", "loss_grad_fn", "expected_loss_terms", "sigmoid_family_expectations",
    "population_trajectory", "PopulationTrajectory", "population_loss", "population_gradient",
    "population_metrics", "gaussian_accuracy",
    "empirical_trajectory", "trajectory_on_data", "EmpiricalTrajectory", "METRICS", "flip_labels",
    "EllipticalPreference", "GaussianMixturePreference", "ELLIPTICAL_FAMILIES", "training_components",
    "fit_gaussian", "behavior_properties", "BehaviorProperties", "ledoit_wolf_shrinkage",
    "theory", "transforms",
    "trajectories", "FallbackWarning",
]
