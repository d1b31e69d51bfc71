"""Evolutionary search for LongRoPE's rescale factors (Ding et al. 2024, §3.2 and Algorithm 1).

A candidate is a vector of d/2 rescale factors λ_i (angle n·θ_i/λ_i) on a grid of step 0.01 in
[1, 1.25·s], non-decreasing in i, plus the number n̂ of leading positions left unscaled. The
fitness is any callable `fitness(scaling) -> float`, lower is better (perplexity of the scaled
model on long windows, see `model_fitness`), so the engine is tested with synthetic ones.

LongRoPE2 (Shang et al. 2025) options, in the same engine: `CriticalDimSpace` (pairs below a
searched critical index c keep NTK's factors, those from c on are searched in [s, 2s]), a searched
attention factor (`search_attention=True`), and any fitness (the recipe's needle-driven one).

- `space`: the genome, the search spaces, their seeds and variation operators;
- `engine`: the configuration, selection and breeding, the run loop, checkpoint and resume;
- `evaluators`: fitness on a model, several candidates per forward, several processes.
"""

from .engine import (HISTORY, OUTPUT_FILES, PLOT, REFERENCE, SCALING, STATE, STATE_VERSION, SUMMARY, Evaluator, Fitness,
                     SearchConfig, SearchResult, Serial, breed, check_out, initial_population, planned_evals,
                     progress_hooks, read_history, read_state, run, select)
from .evaluators import (DIST_TIMEOUT_MINUTES, FITNESSES, NEEDLE_DEPTHS, Batched, DistributedEvaluator, Rank, Terms,
                         candidate_nlls, fitness_name, fitness_windows, init_distributed, model_fitness,
                         parse_fitness, rank_device, run_distributed, search_on_ranks, served_long, serve,
                         term_evaluator, term_fitness)
from .space import (ALGORITHMS, ATTENTION_TOP, GRID_STEP, N_HAT_CHOICES, SHORT_CAP, SPACES, CriticalDimSpace,
                    Genome, SearchSpace, ShortFactorSpace, crossover, init_seeds, load_longrope, mutate, n_hat_choices,
                    resumed_space, seeds_from, theoretical_critical_dim)

__all__ = [
    "ALGORITHMS", "ATTENTION_TOP", "DIST_TIMEOUT_MINUTES", "FITNESSES", "GRID_STEP", "HISTORY", "N_HAT_CHOICES",
    "OUTPUT_FILES", "PLOT", "REFERENCE", "SCALING", "SHORT_CAP", "SPACES", "STATE", "STATE_VERSION", "SUMMARY",
    "NEEDLE_DEPTHS", "Terms", "fitness_name", "parse_fitness", "served_long", "term_evaluator", "term_fitness",
    "Batched", "CriticalDimSpace", "DistributedEvaluator", "Evaluator", "Fitness", "Genome", "Rank", "SearchConfig",
    "SearchResult", "SearchSpace", "Serial", "ShortFactorSpace",
    "breed", "candidate_nlls", "check_out", "crossover", "fitness_windows", "init_distributed", "init_seeds",
    "initial_population", "load_longrope", "model_fitness", "mutate", "n_hat_choices", "planned_evals",
    "progress_hooks",
    "rank_device", "read_history", "read_state", "resumed_space", "run", "run_distributed",
    "search_on_ranks", "seeds_from", "select", "serve", "theoretical_critical_dim",
]
