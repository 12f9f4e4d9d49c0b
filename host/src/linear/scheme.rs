//! Which of its two gradient schemes a `Fused` linear pass takes, and where on a card they cross.
//!
//! - **By chunks of rows** (the row scheme): each chunk's two gradient GEMMs run in the loss's
//!   pass; the `[V, D]` weight gradient is read and written once a chunk.
//! - **By blocks of the vocabulary** (the blocked backward): after the loss, the logits of every
//!   row again per block of classes; each block's weight gradient is written once.
//!
//! Per row, the row scheme moves `2·V·D·b / R` bytes of weight gradient (`R` rows a chunk, `b`
//! bytes an element) where the blocked one computes `2·V·D` more flops, so the two cost alike
//! near `R ∝ F / BW` (tensor-core rate over memory bandwidth) whatever N. Measured (8192 x 4096 x
//! 128256 bf16, fwd + both gradients): on the H200 (F / BW 218 flop/byte) the row scheme 90 ms at
//! 128-row chunks and 55 at 256 against the blocked one's 62 and 57; on an H100 (F / BW 319) the
//! blocked one faster at 256 rows (56.4 against 59.3 ms) and slower at 320 (55.3 against 49.1),
//! a crossover near 276 rows where the ratio of the two cards puts it at 282 (session 63).

/// The fewest rows a `Fused` call's chunks may hold (or every row) to take the row scheme: an
/// in-place hidden-state gradient ([`RawLinearGrads::in_place`](super::RawLinearGrads::in_place))
/// is allowed from here, and a card whose rates are not known takes the row scheme from here.
/// Measured on the H200, where the two schemes cross near it.
pub const ROW_SCHEME_MIN_ROWS: usize = 192;

/// The most rows a card's crossover is put at: the row scheme was the faster at 448-row chunks
/// on an H100, the card of the highest `F / BW` measured (43.9 against 46.6 ms at 8192 x 4096 x
/// 128256 and 10.6 against 12.2 at 1000 x 4096 x 256000).
pub const ROW_SCHEME_MAX_ROWS: usize = 448;

/// The fewest rows a `Fused` call's chunks may hold to take the row scheme, with or without a
/// card: [`ROW_SCHEME_MIN_ROWS`], or `XENT_ROW_SCHEME_MIN_ROWS=R` (R at least 1, which then sets
/// the card's crossover too), for measuring where the two schemes cross.
pub fn row_scheme_min_rows() -> usize {
    row_scheme_override().unwrap_or(ROW_SCHEME_MIN_ROWS)
}

/// `XENT_ROW_SCHEME_MIN_ROWS`, where it holds a positive count of rows.
fn row_scheme_override() -> Option<usize> {
    std::env::var("XENT_ROW_SCHEME_MIN_ROWS")
        .ok()
        .and_then(|r| r.parse::<usize>().ok())
        .filter(|&r| r > 0)
}

/// The rows from which a `Fused` call's chunks take the row scheme on a card of `rates` (`None`:
/// not known): `XENT_ROW_SCHEME_MIN_ROWS` where set, else [`CardRates::crossover_rows`], else
/// [`ROW_SCHEME_MIN_ROWS`].
pub fn row_scheme_rows(rates: Option<CardRates>) -> usize {
    row_scheme_override()
        .or(rates.map(|r| r.crossover_rows()))
        .unwrap_or(ROW_SCHEME_MIN_ROWS)
}

/// A card's dense tensor-core rate on 16-bit inputs and its memory bandwidth, at their peaks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CardRates {
    /// Flop/s.
    pub flops: f64,
    /// Bytes/s of device memory.
    pub bytes_per_s: f64,
}

impl CardRates {
    /// The H200 of the measurements (132 SMs at 1980 MHz; 3201 MHz memory on 6144 bits: 4.9 TB/s).
    pub const H200: CardRates = CardRates::new(132, 1_980_000, 4096.0, 3_201_000, 6144);
    /// An H100 SXM (132 SMs at 1980 MHz; 2619 MHz memory on 5120 bits: 3.35 TB/s).
    pub const H100_SXM: CardRates = CardRates::new(132, 1_980_000, 4096.0, 2_619_000, 5120);

    /// `sms` SMs at `clock_khz`, each of `per_sm_clock` flops a clock, and double-data-rate memory
    /// at `memory_clock_khz` on `bus_bits`.
    const fn new(
        sms: u32,
        clock_khz: i64,
        per_sm_clock: f64,
        memory_clock_khz: i64,
        bus_bits: i64,
    ) -> CardRates {
        CardRates {
            flops: sms as f64 * clock_khz as f64 * 1e3 * per_sm_clock,
            bytes_per_s: 2.0 * memory_clock_khz as f64 * 1e3 * bus_bits as f64 / 8.0,
        }
    }

    /// From a device's attributes: compute capability, SMs (of its context), SM clock and memory
    /// clock (kHz, their peaks) and memory bus width (bits); `None` for an architecture whose
    /// tensor-core rate per SM is not known here (dense 16-bit flops an SM a clock: 2048 on sm_80,
    /// 4096 on sm_90), or a missing attribute.
    pub fn from_attributes(
        (major, minor): (i32, i32),
        sms: u32,
        clock_khz: i64,
        memory_clock_khz: i64,
        bus_bits: i64,
    ) -> Option<CardRates> {
        let per_sm_clock = match (major, minor) {
            (8, 0) => 2048.0,
            (9, 0) => 4096.0,
            _ => return None,
        };
        if sms == 0 || clock_khz <= 0 || memory_clock_khz <= 0 || bus_bits <= 0 {
            return None;
        }
        Some(CardRates::new(
            sms,
            clock_khz,
            per_sm_clock,
            memory_clock_khz,
            bus_bits,
        ))
    }

    /// Flops per byte of device memory.
    pub fn flops_per_byte(&self) -> f64 {
        self.flops / self.bytes_per_s
    }

    /// The rows a chunk at which the two schemes cost alike on this card: [`ROW_SCHEME_MIN_ROWS`]
    /// on the H200, scaled by the card's `F / BW` against the H200's, within
    /// [`ROW_SCHEME_MIN_ROWS`] and [`ROW_SCHEME_MAX_ROWS`] (282 on an H100 SXM; an A100's ratio,
    /// 153-200, is below the H200's, and the row scheme is not taken under 192 rows anywhere).
    pub fn crossover_rows(&self) -> usize {
        let rows =
            ROW_SCHEME_MIN_ROWS as f64 * self.flops_per_byte() / CardRates::H200.flops_per_byte();
        (rows.round() as usize).clamp(ROW_SCHEME_MIN_ROWS, ROW_SCHEME_MAX_ROWS)
    }
}

/// How a call computes its gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Scheme {
    /// In the loss's pass over chunks of rows.
    pub(crate) row_grads: bool,
    /// Afterwards, by blocks of the vocabulary.
    pub(crate) vocab_backward: bool,
}

impl Scheme {
    /// A pass over `rows` rows in chunks of `chunk`: a `Fused` one by rows where one chunk holds
    /// every row, or its chunks hold `rows_from` rows (the card's [`row_scheme_rows`]), or, where
    /// its hidden-state gradient is written over the hidden states (`in_place`, which only the
    /// row scheme can), [`row_scheme_min_rows`].
    pub(crate) fn of(
        pass: super::LinearPass,
        rows: usize,
        chunk: usize,
        rows_from: usize,
        in_place: bool,
    ) -> Scheme {
        use super::LinearPass;
        match pass {
            LinearPass::Forward => Scheme {
                row_grads: false,
                vocab_backward: false,
            },
            LinearPass::Backward { .. } => Scheme {
                row_grads: false,
                vocab_backward: true,
            },
            LinearPass::Fused => {
                let by_rows = chunk >= rows
                    || chunk >= rows_from
                    || (in_place && chunk >= row_scheme_min_rows());
                Scheme {
                    row_grads: by_rows,
                    vocab_backward: !by_rows,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::LinearPass;

    #[test]
    fn the_crossover_follows_the_cards_flops_per_byte() {
        assert_eq!(CardRates::H200.crossover_rows(), 192);
        assert_eq!(CardRates::H100_SXM.crossover_rows(), 282);
        // The attributes of an H100 SXM give its constant; an A100 80GB (108 SMs at 1410 MHz,
        // 1593 MHz memory on 5120 bits) is below the H200's ratio: the floor.
        let h100 = CardRates::from_attributes((9, 0), 132, 1_980_000, 2_619_000, 5120).unwrap();
        assert_eq!(h100, CardRates::H100_SXM);
        let a100 = CardRates::from_attributes((8, 0), 108, 1_410_000, 1_593_000, 5120).unwrap();
        assert!((a100.flops_per_byte() - 153.0).abs() < 1.0, "{a100:?}");
        assert_eq!(a100.crossover_rows(), ROW_SCHEME_MIN_ROWS);
        // A card of a far higher ratio (an H100 with a quarter of the bandwidth): the cap.
        let narrow = CardRates::from_attributes((9, 0), 132, 1_980_000, 655_000, 5120).unwrap();
        assert_eq!(narrow.crossover_rows(), ROW_SCHEME_MAX_ROWS);
        // Unknown architectures and missing attributes: no rates.
        assert_eq!(
            CardRates::from_attributes((8, 9), 128, 2_520_000, 10_501_000, 384),
            None
        );
        assert_eq!(
            CardRates::from_attributes((9, 0), 132, 1_980_000, 0, 5120),
            None
        );
    }

    #[test]
    fn fused_chunks_take_the_row_scheme_from_the_cards_crossover_or_in_place_from_the_floor() {
        // The knob (a measuring aid) would move both thresholds.
        if std::env::var_os("XENT_ROW_SCHEME_MIN_ROWS").is_some() {
            return;
        }
        let fused = |rows, chunk, from, in_place| {
            Scheme::of(LinearPass::Fused, rows, chunk, from, in_place)
        };
        assert!(fused(8192, 282, 282, false).row_grads);
        assert!(!fused(8192, 256, 282, false).row_grads);
        assert!(fused(8192, 256, 282, false).vocab_backward);
        // In place: the row scheme from the floor, below the card's crossover.
        assert!(fused(8192, 256, 282, true).row_grads);
        assert!(!fused(8192, 191, 282, true).row_grads);
        // One chunk of every row.
        assert!(fused(100, 100, 282, false).row_grads);
        assert_eq!(row_scheme_rows(Some(CardRates::H100_SXM)), 282);
        assert_eq!(row_scheme_rows(None), ROW_SCHEME_MIN_ROWS);
        let upstream = crate::raw::RawBuffer::new(0, 1);
        let backward = Scheme::of(LinearPass::Backward { upstream }, 8192, 8192, 1, false);
        assert!(backward.vocab_backward && !backward.row_grads);
    }
}
