//! Constrained decoding's seam: a [`TokenConstraint`] says which tokens a sequence may sample
//! next (a JSON schema, a grammar) and learns which one it sampled. The engine applies it to
//! the logits before sampling and ends the sequence when the constraint is complete; what the
//! constraint is (llguidance, in the server) is not the engine's business.

use std::sync::Arc;

/// The allowed next tokens: one bit per vocabulary entry, bit `t % 32` of word `t / 32`.
pub type TokenMask = Vec<u32>;

/// One sequence's constraint.
pub trait TokenConstraint: Send {
    /// Which tokens may come next. `Err` means the constraint cannot continue (the sequence
    /// ends with an error).
    fn allowed(&mut self) -> Result<TokenMask, String>;
    /// The token that was sampled (always one `allowed` permitted).
    fn accept(&mut self, token: u32) -> Result<(), String>;
    /// Whether the constrained text is complete: the sequence stops here.
    fn complete(&self) -> bool;
}

/// Makes a fresh constraint for each sequence of a request (each of its `n` choices).
pub trait ConstraintFactory: Send + Sync {
    fn start(&self) -> Box<dyn TokenConstraint>;
}

/// A request's constraint, shared by its choices.
#[derive(Clone)]
pub struct Constraint(pub Arc<dyn ConstraintFactory>);

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

/// Sets the logits of every token `mask` does not allow to minus infinity.
pub fn apply(mask: &[u32], logits: &mut [f32]) {
    for (t, l) in logits.iter_mut().enumerate() {
        let allowed = mask.get(t / 32).is_some_and(|w| w >> (t % 32) & 1 == 1);
        if !allowed {
            *l = f32::NEG_INFINITY;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_tokens_can_never_win() {
        let mut logits = vec![5.0, 1.0, 9.0, 0.5, 3.0];
        // Tokens 1 and 4 only.
        apply(&[0b10010], &mut logits);
        assert_eq!(logits[0], f32::NEG_INFINITY);
        assert_eq!(logits[2], f32::NEG_INFINITY);
        assert_eq!((logits[1], logits[4]), (1.0, 3.0));
    }
}
