"""Networks and the parameterization wrapper that turns any network into score / eps / x0."""
from .wrapper import NonFiniteError, OracleModel, ScoreModel

__all__ = ["ScoreModel", "OracleModel", "NonFiniteError"]
