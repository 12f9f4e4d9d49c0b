//! The one error type of the crate.

use std::fmt;

/// Everything that can go wrong. Bad input is reported, never panicked on.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// The CUDA driver library (libcuda) could not be loaded.
    NoDriver,
    /// The driver is present but has no device with this ordinal.
    NoDevice { ordinal: usize, count: usize },
    /// The device is older than compute capability 8.0 (bf16 conversions need sm_80).
    UnsupportedComputeCapability { major: i32, minor: i32 },
    /// A CUDA driver call failed.
    Driver(String),
    /// `vocab` is 0: there is no class to score against.
    EmptyVocab,
    /// `vocab` does not fit the kernels' 32-bit column index.
    VocabTooLarge { vocab: usize },
    /// Rows overlap: `row_stride < vocab`.
    RowStrideTooSmall { row_stride: usize, vocab: usize },
    /// The logits buffer is shorter than `(rows - 1) * row_stride + vocab` elements.
    LogitsTooShort { needed: usize, len: usize },
    /// The labels buffer does not hold one label per row.
    LabelsLength { expected: usize, len: usize },
    /// An upstream gradient must hold one value, or one per row.
    UpstreamLength { rows: usize, len: usize },
    /// A shape whose sizes overflow, or that the kernels cannot index.
    BadShape(String),
    /// A label is neither `ignore_index` nor a class in `[0, vocab)`. On the GPU this is detected on
    /// the device and reported when the loss is read; `row` is known only on the CPU.
    LabelOutOfRange {
        count: usize,
        row: Option<usize>,
        label: Option<i64>,
    },
    /// The requested launch plan cannot run this shape on this device.
    PlanDoesNotFit(String),
    /// The buffers live on a different CUDA context from the one this handle was built for.
    ContextMismatch,
    /// A library opened at run time (cuBLASLt) was not found: `tried` says where, and why each
    /// failed; `hint` how to point to it.
    LibraryNotFound {
        library: &'static str,
        hint: String,
        tried: Vec<String>,
    },
    /// An option value out of its range (the message names the option: `label_smoothing`,
    /// `lse_square_scale`, `softcap`, `weight`), an option the GPU path does not implement yet,
    /// or `Loss` buffers made for another number of rows.
    InvalidOption(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoDriver => write!(f, "the CUDA driver (libcuda) could not be loaded"),
            Error::NoDevice { ordinal, count } => {
                write!(
                    f,
                    "no CUDA device with ordinal {ordinal} ({count} device(s) found)"
                )
            }
            Error::UnsupportedComputeCapability { major, minor } => write!(
                f,
                "compute capability {major}.{minor} is not supported (xent needs 8.0 or newer)"
            ),
            Error::Driver(msg) => write!(f, "CUDA driver error: {msg}"),
            Error::EmptyVocab => write!(f, "vocab is 0: nothing to score against"),
            Error::VocabTooLarge { vocab } => {
                write!(f, "vocab {vocab} is too large (at most {})", u32::MAX / 2)
            }
            Error::RowStrideTooSmall { row_stride, vocab } => {
                write!(f, "row_stride {row_stride} is smaller than vocab {vocab}")
            }
            Error::LogitsTooShort { needed, len } => {
                write!(f, "logits hold {len} elements, the shape needs {needed}")
            }
            Error::LabelsLength { expected, len } => {
                write!(
                    f,
                    "labels hold {len} values, the shape needs {expected} (one per row)"
                )
            }
            Error::UpstreamLength { rows, len } => write!(
                f,
                "the upstream gradient holds {len} values: it needs 1 or one per row ({rows})"
            ),
            Error::BadShape(msg) => write!(f, "bad shape: {msg}"),
            Error::LabelOutOfRange { count, row, label } => {
                write!(
                    f,
                    "{count} label(s) out of range (neither ignore_index nor in [0, vocab))"
                )?;
                if let (Some(row), Some(label)) = (row, label) {
                    write!(f, ", first at row {row}: {label}")?;
                }
                Ok(())
            }
            Error::PlanDoesNotFit(msg) => write!(f, "launch plan does not fit: {msg}"),
            Error::ContextMismatch => {
                write!(
                    f,
                    "the stream belongs to another CUDA context than this handle's"
                )
            }
            Error::InvalidOption(msg) => write!(f, "invalid option: {msg}"),
            Error::LibraryNotFound {
                library,
                hint,
                tried,
            } => {
                write!(f, "{library} could not be loaded ({hint}); tried:")?;
                for attempt in tried {
                    write!(f, "\n  {attempt}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Error {}

impl From<cudarc::driver::DriverError> for Error {
    fn from(err: cudarc::driver::DriverError) -> Self {
        Error::Driver(err.to_string())
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
