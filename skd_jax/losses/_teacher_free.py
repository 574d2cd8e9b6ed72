"""TF-KD's manually designed virtual teacher (Yuan et al., CVPR 2020), the "reg" variant."""

import jax
import jax.numpy as jnp

from skd_jax.losses._soft_targets import _as_float32
from skd_jax.losses._soft_targets import _check_shapes
from skd_jax.losses._soft_targets import _check_temperature


def tfkd_reg_targets(
    labels: jax.typing.ArrayLike, *, correct_prob: float = 0.99, temperature: float = 20.0
) -> jax.Array:
  r"""TF-KD (reg)'s virtual-teacher distribution :math:`p^d` from one-hot labels.

  The teacher's *probabilities* :math:`u` (:math:`a` on the true class, :math:`(1-a)/(C-1)` on
  every other class) are used as logits and softened by :math:`T`:

  .. math::
    u_c = a\,y_c + \frac{1-a}{C-1}(1 - y_c), \qquad p^d = \mathrm{softmax}(u / T)

  so with the paper's :math:`a = 0.99, T = 20` the teacher is close to uniform (for
  :math:`C = 100` the true class gets about 0.0105). This is what the official code computes
  (``my_loss_function.py``, ``loss_kd_regularization``), not the :math:`u` the paper's text
  describes.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> t = losses.tfkd_reg_targets(jnp.array([[1., 0.]]), correct_prob=0.99, temperature=1.0)
  >>> float(t[0, 0])  # softmax([0.99, 0.01]): sigmoid(0.98)
  0.7271...

  Args:
    labels: ``[..., C]`` one-hot labels.
    correct_prob: :math:`a`, the true class's probability before softening (0.99).
    temperature: :math:`T > 0` (20 for ResNet-18 on CIFAR-100).

  Returns:
    ``[..., C]`` float32 target distributions.
  """
  _check_temperature(temperature)
  labels = _as_float32(labels, 'labels')
  num_classes = labels.shape[-1]
  u = correct_prob * labels + (1.0 - correct_prob) / (num_classes - 1) * (1.0 - labels)
  return jax.nn.softmax(u / temperature, axis=-1)


def tfkd_reg_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    correct_prob: float = 0.99,
    temperature: float = 20.0,
) -> jax.Array:
  r"""TF-KD (reg): KL divergence from the virtual teacher to the un-softened student.

  .. math::
    L = \mathrm{KL}\big(p^d \,\|\, \mathrm{softmax}(z)\big)
      = \sum_c p^d_c \big(\log p^d_c - \log \mathrm{softmax}(z)_c\big)

  with :math:`p^d` from :func:`tfkd_reg_targets`. The student is *not* divided by :math:`T` and
  there is no :math:`T^2` factor (the official code's choice). Summed over classes; the paper's
  loss is :math:`(1-\alpha)\,H(y, z) + \alpha\, m\, \mathrm{KL}_{\mathrm{mean}}` where PyTorch's
  ``KLDivLoss()`` divides by :math:`B \cdot C`, i.e. this function with weight
  :math:`\alpha m / C` averaged over the batch (:math:`\alpha = 0.1, m = 100` on CIFAR-100 give
  0.1). Gradients do not flow into the (constant) teacher.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> y = jnp.array([[1., 0.]])
  >>> t = losses.tfkd_reg_targets(y, temperature=1.0)
  >>> losses.tfkd_reg_loss(jnp.log(t), y, temperature=1.0)  # the student is the teacher
  Array([0.], dtype=float32)
  >>> float(losses.tfkd_reg_loss(jnp.zeros((1, 2)), y, temperature=1.0)[0])  # log 2 - H(p^d)
  0.1070...

  Args:
    logits: ``[B, C]`` student logits.
    labels: ``[B, C]`` one-hot labels.
    correct_prob: :math:`a` (0.99).
    temperature: :math:`T` of the teacher only (20).

  Returns:
    ``[B]`` float32 per-example loss.
  """
  _check_temperature(temperature)
  logits, labels = _as_float32(logits, 'logits'), _as_float32(labels, 'labels')
  _check_shapes(logits=logits, labels=labels)
  num_classes = labels.shape[-1]
  u = correct_prob * labels + (1.0 - correct_prob) / (num_classes - 1) * (1.0 - labels)
  log_teacher = jax.nn.log_softmax(u / temperature, axis=-1)
  log_student = jax.nn.log_softmax(logits, axis=-1)
  return jnp.sum(jnp.exp(log_teacher) * (log_teacher - log_student), axis=-1)
