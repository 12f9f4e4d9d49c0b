//! A handle's setting that is left to a default until someone sets it: `None` (the default: an
//! environment variable or a rule decides), `Some(false)` or `Some(true)`, in one atomic, so that
//! a shared handle can be set through `&self` (`CublasLt::set_tuning`,
//! `CrossEntropy::set_weight_grad_gemm`).

use std::sync::atomic::{AtomicU8, Ordering};

/// `Option<bool>` in an atomic: 0 `None`, 1 `Some(false)`, 2 `Some(true)`.
#[derive(Debug, Default)]
pub(crate) struct Setting(AtomicU8);

impl Setting {
    pub(crate) fn set(&self, value: Option<bool>) {
        let code = match value {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        };
        self.0.store(code, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> Option<bool> {
        match self.0.load(Ordering::Relaxed) {
            1 => Some(false),
            2 => Some(true),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_reads_back_what_was_set() {
        let setting = Setting::default();
        assert_eq!(setting.get(), None);
        for value in [Some(true), Some(false), None] {
            setting.set(value);
            assert_eq!(setting.get(), value);
        }
    }
}
