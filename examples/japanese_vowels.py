"""Bidirectional LSTM speaker classifier on the JapaneseVowels data set.

JapaneseVowels (UCI / UEA archive): nine male speakers utter the Japanese
vowels /ae/; each utterance is a series of 12 LPC cepstrum coefficients whose
length varies from 7 to 29 frames. 270 training and 370 test utterances; the
task is to tell which of the 9 speakers is talking.

The sequences are padded to the longest one (29 frames) and the true lengths
are passed to the RNN as ``seq_lengths``: nothing is truncated or resampled.
The backward direction of the bidirectional LSTM starts at each row's last
valid frame, and outputs at padded positions are zero, so a masked mean over
time is just ``outputs.sum(axis=1) / lengths``.

Recipe: per-channel standardisation (train-set statistics); a bidirectional
``OptimizedLSTMCell`` layer; masked mean and max over time; dropout; a linear
layer to 9 classes. Training: AdamW with linear warm-up and cosine decay,
gradient clipping, label smoothing and Gaussian noise on the valid input
frames. The test accuracy is plotted per epoch but never used to pick a model:
the reported number is that of the last epoch.

The data are read from the copy bundled inside the ``aeon`` package (no
network access). Run::

  python -m examples.japanese_vowels --out out/demo

It prints the test accuracy and writes ``training_curve.png`` and an Orbax
checkpoint of ``nnx.state(model)`` (parameters only: the model stores no
random state, randomness is passed in as ``rngs``) into ``--out``. To restore
it::

  abstract = nnx.eval_shape(lambda: Classifier(128, 0.3, 0.3, 'meanmax', rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  state = orbax.checkpoint.StandardCheckpointer().restore('/abs/out/demo/checkpoint', state)
  model = nnx.merge(graphdef, state)
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import nnx_recurrent as nr

MAX_LEN = 29
NUM_CHANNELS = 12
NUM_CLASSES = 9
NUM_TRAIN = 270  # training utterances; an epoch is NUM_TRAIN // batch_size steps


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description='Train a bidirectional LSTM on JapaneseVowels (speaker classification).',
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument('--epochs', type=int, default=30, help='number of training epochs')
  p.add_argument('--hidden', type=int, default=128, help='LSTM hidden size per direction')
  p.add_argument('--seed', type=int, default=0, help='seed for init, shuffling and dropout')
  p.add_argument('--out', default='out/demo', help='output folder (plot + checkpoint)')
  p.add_argument('--batch-size', type=int, default=30, help='training batch size')
  p.add_argument('--lr', type=float, default=3e-3, help='peak learning rate')
  p.add_argument('--weight-decay', type=float, default=1e-4, help='AdamW weight decay')
  p.add_argument('--warmup-epochs', type=int, default=3, help='linear warm-up epochs')
  p.add_argument('--dropout', type=float, default=0.3, help='dropout before the classifier')
  p.add_argument('--noise', type=float, default=0.3, help='std of Gaussian input noise')
  p.add_argument('--label-smoothing', type=float, default=0.1, help='label smoothing')
  p.add_argument('--pool', choices=('mean', 'meanmax'), default='meanmax', help='time pooling')
  p.add_argument('--no-progress', action='store_true', help='disable the progress bar')
  args = p.parse_args(argv)
  if not 0 <= args.warmup_epochs < args.epochs:
    p.error(f'--warmup-epochs must be in [0, --epochs) = [0, {args.epochs}), '
            f'got {args.warmup_epochs}')
  if not 1 <= args.batch_size <= NUM_TRAIN:
    p.error(f'--batch-size must be in [1, {NUM_TRAIN}] (the training set), got {args.batch_size}')
  if not 0 <= args.dropout < 1:
    p.error(f'--dropout must be in [0, 1), got {args.dropout}')
  return args


# --------------------------------------------------------------------------- data


def _pad(series: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Stacks (channels, time) arrays into (batch, MAX_LEN, channels) + lengths."""
  lengths = np.array([s.shape[1] for s in series], dtype=np.int32)
  x = np.zeros((len(series), MAX_LEN, NUM_CHANNELS), dtype=np.float32)
  for i, s in enumerate(series):
    x[i, : s.shape[1]] = s.T
  return x, lengths


def load_data() -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
  """Returns ``(x, lengths, labels)`` for train and test, normalised.

  Per-channel mean and standard deviation come from the valid frames of the
  training set only; padded frames stay exactly zero.
  """
  from aeon.datasets import load_japanese_vowels  # reads aeon's bundled .ts files

  splits = []
  for split in ('TRAIN', 'TEST'):
    series, labels = load_japanese_vowels(split=split)
    x, lengths = _pad(series)
    y = labels.astype(np.int32) - 1  # labels are the strings "1".."9"
    splits.append((x, lengths, y))
  (x_tr, l_tr, y_tr), (x_te, l_te, y_te) = splits

  valid_tr = np.arange(MAX_LEN)[None, :] < l_tr[:, None]
  frames = x_tr[valid_tr]  # (num_valid_frames, channels)
  mean, std = frames.mean(axis=0), frames.std(axis=0) + 1e-6
  valid_te = np.arange(MAX_LEN)[None, :] < l_te[:, None]
  x_tr = np.where(valid_tr[..., None], (x_tr - mean) / std, 0.0).astype(np.float32)
  x_te = np.where(valid_te[..., None], (x_te - mean) / std, 0.0).astype(np.float32)
  return (x_tr, l_tr, y_tr), (x_te, l_te, y_te)


# -------------------------------------------------------------------------- model


class Classifier(nnx.Module):
  """Bidirectional LSTM -> masked mean (and max) over time -> dropout -> Linear."""

  def __init__(self, hidden: int, dropout: float, noise: float, pool: str, *, rngs: nnx.Rngs):
    self.bilstm = nr.Bidirectional(
      nr.RNN(nr.OptimizedLSTMCell(NUM_CHANNELS, hidden, rngs=rngs)),
      nr.RNN(nr.OptimizedLSTMCell(NUM_CHANNELS, hidden, rngs=rngs)),
    )
    self.dropout = nnx.Dropout(dropout)  # no stored rngs: they are passed per call
    self.head = nnx.Linear((4 if pool == 'meanmax' else 2) * hidden, NUM_CLASSES, rngs=rngs)
    self.noise = noise
    self.pool = pool

  def __call__(self, x: jax.Array, lengths: jax.Array, *, rngs: nnx.Rngs | None = None):
    """Logits for ``x`` ``(batch, time, 12)``; ``rngs`` given means training mode."""
    train = rngs is not None
    valid = (jnp.arange(x.shape[1]) < lengths[:, None])[..., None]  # (batch, time, 1)
    if train and self.noise > 0:
      x = x + self.noise * valid * jax.random.normal(rngs.noise(), x.shape)
    h = self.bilstm(x, seq_lengths=lengths)  # (batch, time, 2 * hidden), zero at padding
    pooled = h.sum(axis=1) / lengths[:, None].astype(h.dtype)
    if self.pool == 'meanmax':
      pooled = jnp.concatenate([pooled, jnp.where(valid, h, -jnp.inf).max(axis=1)], axis=-1)
    return self.head(self.dropout(pooled, deterministic=not train, rngs=rngs))


# ----------------------------------------------------------------------- training


def main(argv: Sequence[str] | None = None) -> float:
  """Trains, evaluates, writes the plot and checkpoint; returns the test accuracy."""
  args = parse_args(argv)
  t_start = time.perf_counter()
  (x_tr, l_tr, y_tr), (x_te, l_te, y_te) = load_data()
  n_train = len(y_tr)
  steps_per_epoch = n_train // args.batch_size
  total_steps = args.epochs * steps_per_epoch

  model = Classifier(args.hidden, args.dropout, args.noise, args.pool, rngs=nnx.Rngs(args.seed))
  rngs = nnx.Rngs(dropout=args.seed + 1, noise=args.seed + 2)  # training randomness
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=args.lr,
    warmup_steps=args.warmup_epochs * steps_per_epoch,
    decay_steps=total_steps,
    end_value=args.lr * 0.01,
  )
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(schedule, weight_decay=args.weight_decay),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, rngs, x, lengths, y):
    def loss_fn(model, rngs):
      logits = model(x, lengths, rngs=rngs)
      targets = optax.smooth_labels(jax.nn.one_hot(y, NUM_CLASSES), args.label_smoothing)
      loss = optax.softmax_cross_entropy(logits, targets).mean()
      return loss, logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, rngs)
    optimizer.update(model, grads)
    return loss, (logits.argmax(-1) == y).mean()

  @nnx.jit
  def evaluate(model, x, lengths, y):
    logits = model(x, lengths)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits.argmax(-1) == y).mean()

  data_rng = np.random.default_rng(args.seed)
  history: dict[str, list[float]] = {'train_loss': [], 'train_acc': [], 'test_acc': []}
  bar = tqdm(range(1, args.epochs + 1), desc='epochs', disable=args.no_progress)
  for _epoch in bar:
    perm = data_rng.permutation(n_train)[: steps_per_epoch * args.batch_size]
    losses, accs = [], []
    for idx in perm.reshape(steps_per_epoch, args.batch_size):
      loss, acc = train_step(model, optimizer, rngs, x_tr[idx], l_tr[idx], y_tr[idx])
      losses.append(loss)
      accs.append(acc)
    _, test_acc = evaluate(model, x_te, l_te, y_te)
    history['train_loss'].append(float(np.mean(losses)))
    history['train_acc'].append(float(np.mean(accs)))
    history['test_acc'].append(float(test_acc))
    bar.set_postfix(loss=f'{history["train_loss"][-1]:.3f}', test_acc=f'{float(test_acc):.3f}')

  test_loss, test_acc = evaluate(model, x_te, l_te, y_te)
  test_acc = float(test_acc)
  t_train = time.perf_counter() - t_start
  n_err = round((1 - test_acc) * len(y_te))
  print(
    f'test accuracy: {test_acc:.4f} ({len(y_te) - n_err}/{len(y_te)}), '
    f'test loss {float(test_loss):.4f}, {t_train:.1f}s (load + JIT + train + eval)'
  )

  # Outputs: training curve and checkpoint.
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import orbax.checkpoint as ocp

  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  epochs = np.arange(1, args.epochs + 1)
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  ax_loss.plot(epochs, history['train_loss'])
  ax_loss.set(xlabel='epoch', ylabel='cross-entropy (label-smoothed)', title='training loss')
  ax_acc.plot(epochs, history['train_acc'], label='train (running, with dropout)')
  ax_acc.plot(epochs, history['test_acc'], label='test')
  ax_acc.set(xlabel='epoch', ylabel='accuracy', title='accuracy', ylim=(0.5, 1.005))
  ax_acc.legend(loc='lower right')
  fig.suptitle(f'BiLSTM on JapaneseVowels: test accuracy {test_acc:.2%}')
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'training_curve.png'), dpi=100)
  plt.close(fig)

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out, 'checkpoint'), nnx.state(model), force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()
  print(f'wrote {out}/training_curve.png and {out}/checkpoint')
  return test_acc


if __name__ == '__main__':
  main()
