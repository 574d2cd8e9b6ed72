"""The one error type users see for bad input."""


class ConfigError(ValueError):
  """Invalid configuration or input data.

  The message is one line of the form ``"<field or file>: <what is expected>"``. The command line
  entry point prints it and exits with status 2 before anything is written to the workdir.
  """


class InputError(RuntimeError):
  """The training input failed during a run: a worker died or stopped producing, or a data file
  changed under it.

  The message is one line naming the worker process or the file. When it comes instead of a
  step's batch, a single-process trainer first saves a checkpoint at that step (the step did not
  run, so the state is consistent). The command line exits with status 1; rerunning the command
  continues once the input is repaired.
  """
