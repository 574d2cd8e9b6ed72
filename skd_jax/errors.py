"""The one error type users see for bad input."""


class ConfigError(ValueError):
  """Invalid configuration or input data.

  The message is one line of the form ``"<field or file>: <what is expected>"``. The command line
  entry point prints it and exits with status 2 before anything is written to the workdir.
  """
