"""Azure's exception names that callers catch (fastai's AzureMLCallback catches RunEnvironmentException)."""

from runwatch.core.errors import RunwatchError


class AzureMLException(RunwatchError):
    pass


class RunEnvironmentException(AzureMLException):
    pass


class UserErrorException(AzureMLException):
    pass


__all__ = ["AzureMLException", "RunEnvironmentException", "UserErrorException"]
