"""Built-in environments, registered by name on import: ``calculator`` (a tool-use task for chat models),
``echo_test`` and ``slow_test`` (token-level, for tests on tiny random models)."""
from rollout.environment import register_environment
from rollout.envs.calculator import CalculatorEnvironment
from rollout.envs.testing import EchoTestEnvironment, SlowEnvironment

register_environment("calculator", CalculatorEnvironment)
register_environment("echo_test", EchoTestEnvironment)
register_environment("slow_test", SlowEnvironment)

__all__ = ["CalculatorEnvironment", "EchoTestEnvironment", "SlowEnvironment"]
