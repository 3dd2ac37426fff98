"""Classification losses and metrics (pure functions of logits and integer labels)."""

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, label_smoothing: float = 0.0) -> jnp.ndarray:
    """Per-example softmax cross-entropy against integer labels, optionally label-smoothed."""
    logits = logits.astype(jnp.float32)
    if label_smoothing == 0.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def correct(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """Per-example 1.0 where the arg-max class equals the label."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)


def classification_loss(logits: jnp.ndarray, labels: jnp.ndarray,
                        label_smoothing: float = 0.0) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Mean training loss and the batch metrics ('loss', 'accuracy')."""
    loss = cross_entropy(logits, labels, label_smoothing).mean()
    return loss, {"loss": loss, "accuracy": correct(logits, labels).mean()}


def per_example(values: jnp.ndarray) -> jnp.ndarray:
    """Mean over every axis but the batch (tokens of a sequence), so each example weighs the same."""
    return values.reshape(values.shape[0], -1).mean(axis=1)


def masked_sums(logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Sums of unsmoothed loss and accuracy over the real (mask=1) examples, and their count.

    Works for class logits (B, C) and for per-token logits (B, T, V) with labels (B, T).
    """
    return {
        "loss": jnp.sum(per_example(cross_entropy(logits, labels)) * mask),
        "accuracy": jnp.sum(per_example(correct(logits, labels)) * mask),
        "count": jnp.sum(mask),
    }
