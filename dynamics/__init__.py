"""dpo-dynamics: exact simulation of last-layer DPO learning dynamics.

Im & Li, "Understanding the Learning Dynamics of Alignment with Human
Feedback", ICML 2024 (arXiv:2403.18742). The model and claims are stated and
derived in docs/theory.md.

Data flow: distribution → dynamics (population or empirical) → metrics.
"""
from .distributions import Components, GaussianPreference, diagonal_cov, isotropic_cov, priority_gap
from .priority import loss_series, predicted_loss_drop, priority_score  # covariance-aware (docs/theory.md §4.4)
from .empirical import METRICS, EmpiricalTrajectory, empirical_trajectory, noisy_labels, trajectory_on_data
from .families import ELLIPTICAL_FAMILIES, EllipticalPreference, GaussianMixturePreference
from .fitting import BehaviorProperties, behavior_properties, fit_gaussian, ledoit_wolf_shrinkage
from .gaussian_integrals import sigmoid_family_expectations
from .head import Head
from .losses import (LOSSES, OBJECTIVES, Objective, expected_loss_terms, get_objective, loss_fn, loss_grad_fn,
                     objective_loss)
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
from .vocab import (VocabTrajectory, logp_change_decomposition, pair_tokens, per_pair_metrics, sft_then_dpo,
                    vocab_empirical_trajectory)  # V-token empirical layer (docs/theory.md §7)
from .vocab_population import vocab_population_trajectory  # V-token population layer (docs/theory.md §7)
from .representation import (Representation, RepresentationTrajectory, effective_heads,
                             representation_empirical_trajectory, representation_population_trajectory,
                             representation_properties)  # x = A φ trained with the head (docs/theory.md §10)
from .sequence import (SequencePreference, sequence_empirical_trajectory, sequence_logp_change_decomposition,
                       sequence_pair_metrics, sequence_population_trajectory)  # L-position responses (§9)
from .reward import (oracle_population_loss, oracle_population_trajectory, oracle_empirical_trajectory,
                     rlhf_objective, rlhf_gradient, rlhf_optimum, rlhf_population_trajectory, reinforce_gradient,
                     reinforce_trajectory, policy_metrics)  # ground-truth reward, RLHF (docs/theory.md §11)

__version__ = "0.1.0"

__all__ = [
    "GaussianPreference", "Components", "Head", "isotropic_cov", "diagonal_cov", "priority_gap",
    "LOSSES", "loss_fn", "loss_grad_fn", "expected_loss_terms", "sigmoid_family_expectations",
    "objective_loss", "get_objective", "Objective", "OBJECTIVES",
    "population_trajectory", "PopulationTrajectory", "population_loss", "population_gradient",
    "population_metrics", "gaussian_accuracy",
    "empirical_trajectory", "trajectory_on_data", "EmpiricalTrajectory", "METRICS", "noisy_labels",
    "EllipticalPreference", "GaussianMixturePreference", "ELLIPTICAL_FAMILIES", "training_components",
    "fit_gaussian", "behavior_properties", "BehaviorProperties", "ledoit_wolf_shrinkage",
    "theory", "transforms",
    "trajectories", "FallbackWarning",
    "vocab_population_trajectory", "vocab_empirical_trajectory", "VocabTrajectory", "per_pair_metrics",
    "pair_tokens", "sft_then_dpo", "logp_change_decomposition",
    "SequencePreference", "sequence_empirical_trajectory", "sequence_population_trajectory", "sequence_pair_metrics",
    "sequence_logp_change_decomposition",
    "Representation", "RepresentationTrajectory", "representation_population_trajectory",
    "representation_empirical_trajectory", "representation_properties", "effective_heads",
]
