"""Hardware-aware sub-network search (PAPERS.md §3): plain torch/numpy, plus the Ray pool.

    SuperNetwork (supernet)      elastic variables, activation with shared weights, counts,
      ElasticMLP (mlp)           extraction; built-ins on scikit-learn's digits and
      ElasticFNO (fno)           on the project's PDE data sets; train_supernet (training)
    SearchSpace (space)          variables, choices, canonical keys, one-hot encoding
    SubnetEvaluator (evaluator)  metric on the validation subset, latency, params, MACs
    InProcessPool, EvaluatorPool (pool)   where validations run; the only module using Ray
    RandomSearch, NSGA2Search, Linas (strategies)   ask/tell
    run_search, front (search)   the driver: budget, de-duplication, results rows
    pareto_mask, hypervolume (pareto)

The job that wires them to storage and MLflow is `flows.nas`.
"""

from actors.nas.checkpoint import SUPERNETS, build_supernet, load_supernet
from actors.nas.evaluator import EvaluatorSetup, SubnetEvaluator, SyntheticEvaluator
from actors.nas.fno import ElasticFNO, surrogate_pairs
from actors.nas.latency import LatencyOptions, measure_latency
from actors.nas.mlp import ElasticMLP, digits_splits
from actors.nas.pareto import hypervolume, normalise, pareto_mask
from actors.nas.pool import EvaluatorPool, InProcessPool, Outcome
from actors.nas.search import SearchOutcome, Validation, front, run_search
from actors.nas.space import Config, Key, SearchSpace
from actors.nas.strategies import Linas, NSGA2Search, RandomSearch, Strategy
from actors.nas.supernet import COUNTED, SuperNetwork
from actors.nas.training import TrainOptions, train_supernet

__all__ = [
    "COUNTED",
    "SUPERNETS",
    "Config",
    "ElasticFNO",
    "ElasticMLP",
    "EvaluatorPool",
    "EvaluatorSetup",
    "InProcessPool",
    "Key",
    "LatencyOptions",
    "Linas",
    "NSGA2Search",
    "Outcome",
    "RandomSearch",
    "SearchOutcome",
    "SearchSpace",
    "Strategy",
    "SubnetEvaluator",
    "SuperNetwork",
    "SyntheticEvaluator",
    "TrainOptions",
    "Validation",
    "build_supernet",
    "digits_splits",
    "front",
    "hypervolume",
    "load_supernet",
    "measure_latency",
    "normalise",
    "pareto_mask",
    "run_search",
    "surrogate_pairs",
    "train_supernet",
]
