//! QMP, QEMU's JSON monitor protocol, and QAPI argument handling.
//!
//! - [`wire`]: greeting, a streaming JSON splitter with QEMU's quirks, request
//!   parsing, and return/error/event encoding (CRLF lines, ASCII only).
//! - [`keyval`]: QEMU's `a=1,b.c=x,,y` command-line syntax, to a JSON tree of strings.
//! - [`visitor`]: typed QAPI values from JSON (strict types) or keyval (strings
//!   converted by the expected type), with QEMU's exact error texts and member paths.
//! - [`schema`]: the QAPI types bexd implements, each declared once (`qapi_struct!`,
//!   `qapi_enum!`) or read by hand beside its [`introspect::Describe`].
//! - [`introspect`]: `query-qmp-schema`, rendered from those descriptions.

mod declare;
pub mod error;
pub mod introspect;
pub mod keyval;
pub mod schema;
pub mod visitor;
pub mod wire;

pub use error::{ErrorClass, QmpError};
