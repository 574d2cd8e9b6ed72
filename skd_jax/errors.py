"""The errors a run ends with, and the one way to quote another error in a one-line message.

Each class's message is one line. The command line entry point (``skd_jax.main``) maps them to
exit statuses: :class:`ConfigError` to 2 before anything is written; :class:`InputError`,
:class:`Diverged` and :class:`SaveError` to 1; :class:`Preempted` to the signal's status.
"""


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


class Interrupted(Exception):
  """Waiting for a step's batch stopped because a signal arrived (single process only).

  The trainer stops as it would at a step boundary: the step did not run.
  """


class Preempted(Exception):
  """A signal stopped the run: after saving a checkpoint, or before anything was written."""


class Diverged(FloatingPointError):
  """A non-finite loss, gradient norm or state stopped the run.

  Attributes:
    kept_step: the step of the last committed checkpoint, or None when there is none.
  """

  def __init__(self, cause: str, kept_step: int | None, checkpoints: str):
    self.kept_step = kept_step
    if kept_step is None:
      kept = 'no checkpoint was saved; rerunning starts again from scratch'
    else:
      kept = f'the checkpoint at step {kept_step} is kept ({checkpoints}/{kept_step})'
    super().__init__(
        f'{cause}; stopped, {kept}. To take another path, rerun with changed optim settings, '
        'e.g. a lower --config.optim.lr (README: "Changing hyperparameters on resume")'
    )


class SaveError(OSError):
  """A checkpoint could not be written; the message is one line with the path and the cause."""


class ModelError(ValueError):
  """An exported model that cannot be used: its spec is invalid or disagrees with the stored
  arrays, or its files do not read or do not match their fingerprint.

  The message is one line naming the file (``.../model/spec`` or ``.../model/variables``) and the
  field or array at fault.
  """


def first_line(error: BaseException) -> str:
  """The first non-blank line of ``error``'s message, stripped; '' when the message is blank.

  Library errors (orbax, tensorstore, the coordination service, a plug-in's import) often carry
  a multi-line message or a whole traceback; the first line is the part worth quoting in a
  one-line message.
  """
  return next((line.strip() for line in str(error).splitlines() if line.strip()), '')
