"""Search strategies behind one ask/tell interface: random, NSGA-II (pymoo), LINAS."""

from actors.nas.strategies.base import BatchStrategy, Strategy
from actors.nas.strategies.linas import Linas
from actors.nas.strategies.nsga2 import NSGA2Search
from actors.nas.strategies.random_search import RandomSearch

__all__ = ["BatchStrategy", "Linas", "NSGA2Search", "RandomSearch", "Strategy"]
