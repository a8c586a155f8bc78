//! The server side of the fixed-newstyle handshake, as a state machine.
//!
//! The shell feeds socket bytes with [`ServerHandshake::receive`], calls
//! [`ServerHandshake::advance`] and writes [`ServerHandshake::take_output`]
//! after every call (also after `Closed`, `Done` and errors: an error reply or
//! the final ACK may be pending).
//!
//! ```text
//!  ClientFlags ──► OptionHeader ──► Payload ──► (option handler) ──┐
//!                      ▲  │                                         │
//!                      │  └──► Skipping ──► (queued error reply) ───┤
//!                      └────────────────────────────────────────────┘
//!                         STARTTLS ─► AwaitingTls ─► tls_established ─► OptionHeader
//!                         GO / EXPORT_NAME ─► Finished (Done)   ABORT ─► Finished (Closed)
//! ```
//!
//! The decision about an option is taken from its 16-byte header alone
//! (`ServerHandshake::plan`): options that can only be answered with an
//! error (unknown ones, ones that need TLS first, ones with a payload where
//! none is allowed, oversized ones) are skipped as their bytes stream in and
//! never buffered. Everything negotiated lives in one `Session` value that a
//! completed STARTTLS replaces wholesale, so nothing negotiated in plaintext
//! survives the upgrade (the lesson of nbdkit's CVE-2021-3716).

mod meta;
mod options;
mod wire;

use thiserror::Error;

use crate::consts::*;
use crate::export::{ExportCatalog, ExportInfo, MetaContext};
use crate::types::{OptionReplyType, OptionType};
use wire::{error_reply, option_name, option_reply};

/// Option payloads up to this size are buffered and parsed. No well-formed
/// option a real client sends comes close (a GO is a name of at most 4 KiB
/// plus a few info requests); longer ones get NBD_REP_ERR_TOO_BIG after being
/// skipped, so a handshaking client pins at most this much memory.
const MAX_BUFFERED_OPTION: u32 = 64 * 1024;

/// Whether the server requires TLS (NOTLS or FORCEDTLS in the spec's terms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    None,
    Required,
}

#[derive(Clone, Debug)]
pub struct HandshakeConfig {
    pub tls: TlsMode,
}

/// The outcome of a successful handshake: what transmission needs.
#[derive(Clone, Debug)]
pub struct Negotiated {
    pub export: ExportInfo,
    /// READ replies must be structured, and errors may carry messages.
    pub structured_replies: bool,
    /// EXTENDED_HEADERS was negotiated: 32-byte requests with 64-bit
    /// lengths, and every reply an extended chunk (structured replies too).
    pub extended_headers: bool,
    /// Contexts selected by the last SET_META_CONTEXT for this export, with
    /// their ids, for BLOCK_STATUS. Empty means BLOCK_STATUS gets EINVAL.
    pub meta_contexts: Vec<(u32, MetaContext)>,
    /// The flags the client was told; request validation checks against these.
    pub transmission_flags: u16,
}

/// What the shell must do next.
#[derive(Debug)]
pub enum HandshakeStatus {
    /// Read more bytes and call `receive`, then `advance`.
    NeedInput,
    /// Write the output, then run the TLS handshake and call `tls_established`.
    StartTls,
    /// Write the output, then enter transmission with `take_leftover()` bytes first.
    Done(Box<Negotiated>),
    /// Write the output, then close (the client aborted).
    Closed,
}

/// A violation that ends the connection (after writing any pending output).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("Unknown client flags {0:#x} received")]
    UnknownClientFlags(u32),
    #[error("Bad option magic {0:#x} received")]
    BadOptionMagic(u64),
    #[error("Option {option:?} length {len} exceeds the 32 MiB limit")]
    OptionTooLong { option: OptionType, len: u32 },
    #[error("Client without fixed newstyle sent option {0:?}; only EXPORT_NAME is allowed")]
    NotFixedNewstyle(OptionType),
    #[error("NBD_OPT_EXPORT_NAME with a name of {0} bytes (bad length received)")]
    ExportNameTooLong(u32),
    #[error("NBD_OPT_EXPORT_NAME for unknown export '{0}'")]
    UnknownExport(String),
    #[error("Option {0:#x} not permitted before TLS")]
    TlsRequired(u32),
    #[error("NBD_OPT_STARTTLS with a payload; cannot start TLS")]
    StartTlsWithPayload,
    #[error("Handshake already finished")]
    Finished,
    /// EXPORT_NAME cannot answer in extended mode (no flags for it), so QEMU drops the client.
    #[error("Extended headers already negotiated")]
    ExtendedHeadersNegotiated,
}

/// Everything negotiated so far; replaced whole by STARTTLS.
#[derive(Debug, Default)]
struct Session {
    structured_replies: bool,
    /// EXTENDED_HEADERS was acked; implies `structured_replies`.
    extended_headers: bool,
    /// The export name given to the last SET_META_CONTEXT and what it
    /// selected; only valid if GO later picks the same export.
    meta: Option<(String, Vec<(u32, MetaContext)>)>,
}

/// Where the input stream is.
#[derive(Debug)]
enum Phase {
    /// Waiting for the 4-byte client flags.
    ClientFlags,
    /// Waiting for a 16-byte option header.
    OptionHeader,
    /// Waiting for `len` bytes of payload to parse.
    Payload { option: OptionType, len: u32 },
    /// Discarding `remaining` bytes, then sending `reply` with `message`.
    Skipping {
        option: OptionType,
        remaining: u32,
        reply: OptionReplyType,
        message: String,
    },
    /// STARTTLS was acked; the shell runs the TLS handshake.
    AwaitingTls,
    /// GO, EXPORT_NAME, ABORT or an error ended the handshake.
    Finished,
}

/// What the option header alone decides.
enum Plan {
    /// Buffer the payload, then parse and handle it.
    Read,
    /// Skip the payload, then answer with this error.
    Skip(OptionReplyType, String),
    /// Answer ABORT (ACK, or an error before TLS) and close.
    Abort(OptionReplyType, String),
    /// Send this error reply, then end the connection with the error.
    Fatal(OptionReplyType, String, HandshakeError),
}

/// What handling one option decided.
enum Step {
    Continue,
    StartTls,
    Done(Box<Negotiated>),
    Closed,
}

/// The server's handshake with one client.
pub struct ServerHandshake {
    config: HandshakeConfig,
    /// Bytes received and not yet consumed; after the end, the leftover.
    input: Vec<u8>,
    output: Vec<u8>,
    phase: Phase,
    session: Session,
    /// From the client flags: these survive STARTTLS (they precede it).
    fixed_newstyle: bool,
    no_zeroes: bool,
    tls_active: bool,
}

impl std::fmt::Debug for ServerHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandshake")
            .field("phase", &self.phase)
            .field("session", &self.session)
            .field("tls_active", &self.tls_active)
            .finish_non_exhaustive()
    }
}

impl ServerHandshake {
    /// Starts a handshake; the greeting is queued as the first output.
    pub fn new(config: HandshakeConfig) -> Self {
        let mut output = Vec::with_capacity(GREETING_LEN);
        output.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        output.extend_from_slice(&IHAVEOPT.to_be_bytes());
        output.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        Self {
            config,
            input: Vec::new(),
            output,
            phase: Phase::ClientFlags,
            session: Session::default(),
            fixed_newstyle: false,
            no_zeroes: false,
            tls_active: false,
        }
    }

    /// Appends bytes read from the socket; nothing is processed until `advance`.
    pub fn receive(&mut self, data: &[u8]) {
        self.input.extend_from_slice(data);
    }

    /// Bytes to write to the socket now (may be empty).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Bytes received after the handshake ended: the client's first requests.
    pub fn take_leftover(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.input)
    }

    /// The TLS session is up: forget everything negotiated in plaintext,
    /// including any plaintext the client sent after STARTTLS (it could have
    /// been injected by a man in the middle). Ignored unless STARTTLS was acked.
    pub fn tls_established(&mut self) {
        if !matches!(self.phase, Phase::AwaitingTls) {
            return;
        }
        self.tls_active = true;
        self.session = Session::default();
        self.input.clear();
        self.phase = Phase::OptionHeader;
    }

    /// Processes buffered input as far as it goes. After an error the
    /// handshake is over: write the output, then close.
    pub fn advance(
        &mut self,
        catalog: &dyn ExportCatalog,
    ) -> Result<HandshakeStatus, HandshakeError> {
        let result = self.run(catalog);
        if result.is_err() {
            self.phase = Phase::Finished;
        }
        result
    }

    fn run(&mut self, catalog: &dyn ExportCatalog) -> Result<HandshakeStatus, HandshakeError> {
        loop {
            let step = match self.poll_step(catalog)? {
                None => return Ok(HandshakeStatus::NeedInput),
                Some(step) => step,
            };
            match step {
                Step::Continue => {}
                Step::StartTls => {
                    self.phase = Phase::AwaitingTls;
                    return Ok(HandshakeStatus::StartTls);
                }
                Step::Done(negotiated) => {
                    self.phase = Phase::Finished;
                    return Ok(HandshakeStatus::Done(negotiated));
                }
                Step::Closed => {
                    self.phase = Phase::Finished;
                    return Ok(HandshakeStatus::Closed);
                }
            }
        }
    }

    /// Makes one step of progress, or `None` if more input is needed.
    fn poll_step(&mut self, catalog: &dyn ExportCatalog) -> Result<Option<Step>, HandshakeError> {
        match std::mem::replace(&mut self.phase, Phase::Finished) {
            Phase::Finished => Err(HandshakeError::Finished),
            Phase::AwaitingTls => {
                self.phase = Phase::AwaitingTls;
                Ok(Some(Step::StartTls))
            }
            Phase::ClientFlags => self.read_client_flags(),
            Phase::OptionHeader => self.read_option_header(),
            Phase::Payload { option, len } => self.read_payload(option, len, catalog),
            Phase::Skipping {
                option,
                remaining,
                reply,
                message,
            } => Ok(self.skip(option, remaining, reply, message)),
        }
    }

    fn read_client_flags(&mut self) -> Result<Option<Step>, HandshakeError> {
        let Some(flags) = self.take_array::<4>().map(u32::from_be_bytes) else {
            self.phase = Phase::ClientFlags;
            return Ok(None);
        };
        let known = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;
        if flags & !known != 0 {
            return Err(HandshakeError::UnknownClientFlags(flags));
        }
        self.fixed_newstyle = flags & CLIENT_FLAG_FIXED_NEWSTYLE != 0;
        self.no_zeroes = flags & CLIENT_FLAG_NO_ZEROES != 0;
        self.phase = Phase::OptionHeader;
        Ok(Some(Step::Continue))
    }

    fn read_option_header(&mut self) -> Result<Option<Step>, HandshakeError> {
        let Some(header) = self.take_array::<OPTION_HEADER_LEN>() else {
            self.phase = Phase::OptionHeader;
            return Ok(None);
        };
        let [m0, m1, m2, m3, m4, m5, m6, m7, o0, o1, o2, o3, l0, l1, l2, l3] = header;
        let magic = u64::from_be_bytes([m0, m1, m2, m3, m4, m5, m6, m7]);
        let option = OptionType(u32::from_be_bytes([o0, o1, o2, o3]));
        let len = u32::from_be_bytes([l0, l1, l2, l3]);
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        match self.plan(option, len)? {
            Plan::Read => self.phase = Phase::Payload { option, len },
            Plan::Skip(reply, message) => {
                self.phase = Phase::Skipping {
                    option,
                    remaining: len,
                    reply,
                    message,
                }
            }
            Plan::Abort(reply, message) => {
                // The client may not even wait for this reply; its payload
                // (there should be none) is irrelevant since we close.
                option_reply(&mut self.output, option, reply, message.as_bytes());
                return Ok(Some(Step::Closed));
            }
            Plan::Fatal(reply, message, error) => {
                error_reply(&mut self.output, option, reply, &message);
                return Err(error);
            }
        }
        Ok(Some(Step::Continue))
    }

    /// Decides from the header alone how to treat an option, like QEMU's
    /// `nbd_negotiate_options` does before reading any payload.
    fn plan(&self, option: OptionType, len: u32) -> Result<Plan, HandshakeError> {
        if len > MAX_OPTION_LEN {
            return Err(HandshakeError::OptionTooLong { option, len });
        }
        if !self.fixed_newstyle && option != OptionType::EXPORT_NAME {
            return Err(HandshakeError::NotFixedNewstyle(option));
        }
        if self.config.tls == TlsMode::Required && !self.tls_active {
            return Self::plan_before_tls(option, len);
        }
        let invalid = |msg: String| Plan::Skip(OptionReplyType::ERR_INVALID, msg);
        let plan = match option {
            // QEMU refuses this before it looks at the name.
            OptionType::EXPORT_NAME if self.session.extended_headers => {
                return Err(HandshakeError::ExtendedHeadersNegotiated)
            }
            OptionType::EXPORT_NAME if len as usize > MAX_STRING => {
                return Err(HandshakeError::ExportNameTooLong(len))
            }
            OptionType::ABORT => Plan::Abort(OptionReplyType::ACK, String::new()),
            OptionType::LIST
            | OptionType::STARTTLS
            | OptionType::STRUCTURED_REPLY
            | OptionType::EXTENDED_HEADERS
                if len > 0 =>
            {
                invalid(unexpected_length(option))
            }
            OptionType::EXPORT_NAME
            | OptionType::LIST
            | OptionType::STARTTLS
            | OptionType::STRUCTURED_REPLY
            | OptionType::EXTENDED_HEADERS => Plan::Read,
            OptionType::INFO
            | OptionType::GO
            | OptionType::LIST_META_CONTEXT
            | OptionType::SET_META_CONTEXT => match len > MAX_BUFFERED_OPTION {
                true => Plan::Skip(OptionReplyType::ERR_TOO_BIG, too_big(option, len)),
                false => Plan::Read,
            },
            _ => Plan::Skip(OptionReplyType::ERR_UNSUP, unsupported(option)),
        };
        Ok(plan)
    }

    /// FORCEDTLS before the upgrade: only STARTTLS gets anywhere. As in
    /// QEMU, EXPORT_NAME disconnects, ABORT is answered with TLS_REQD and
    /// closes, and STARTTLS with a payload gets ERR_INVALID and disconnects.
    fn plan_before_tls(option: OptionType, len: u32) -> Result<Plan, HandshakeError> {
        let not_permitted = format!("Option {:#x} not permitted before TLS", option.0);
        match option {
            OptionType::STARTTLS if len > 0 => Ok(Plan::Fatal(
                OptionReplyType::ERR_INVALID,
                unexpected_length(option),
                HandshakeError::StartTlsWithPayload,
            )),
            OptionType::STARTTLS => Ok(Plan::Read),
            OptionType::EXPORT_NAME => Err(HandshakeError::TlsRequired(option.0)),
            OptionType::ABORT => Ok(Plan::Abort(OptionReplyType::ERR_TLS_REQD, not_permitted)),
            _ => Ok(Plan::Skip(OptionReplyType::ERR_TLS_REQD, not_permitted)),
        }
    }

    fn read_payload(
        &mut self,
        option: OptionType,
        len: u32,
        catalog: &dyn ExportCatalog,
    ) -> Result<Option<Step>, HandshakeError> {
        let len = len as usize;
        if self.input.len() < len {
            self.phase = Phase::Payload {
                option,
                len: len as u32,
            };
            return Ok(None);
        }
        let payload: Vec<u8> = self.input.drain(..len).collect();
        self.phase = Phase::OptionHeader;
        self.handle_option(option, &payload, catalog).map(Some)
    }

    /// Discards what has arrived of a skipped payload; once all of it is
    /// gone, sends the decided error reply.
    fn skip(
        &mut self,
        option: OptionType,
        remaining: u32,
        reply: OptionReplyType,
        message: String,
    ) -> Option<Step> {
        let n = (remaining as usize).min(self.input.len());
        self.input.drain(..n);
        let remaining = remaining - n as u32;
        if remaining > 0 {
            self.phase = Phase::Skipping {
                option,
                remaining,
                reply,
                message,
            };
            return None;
        }
        error_reply(&mut self.output, option, reply, &message);
        self.phase = Phase::OptionHeader;
        Some(Step::Continue)
    }

    fn take_array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let bytes: [u8; N] = self.input.get(..N)?.try_into().ok()?;
        self.input.drain(..N);
        Some(bytes)
    }

    /// Appends an ACK (or any payload-free success reply).
    fn ack(&mut self, option: OptionType) {
        option_reply(&mut self.output, option, OptionReplyType::ACK, &[]);
    }

    fn error(&mut self, option: OptionType, reply: OptionReplyType, message: &str) {
        error_reply(&mut self.output, option, reply, message);
    }
}

/// QEMU's text for ERR_UNSUP.
fn unsupported(option: OptionType) -> String {
    format!("Unsupported option {} ({})", option.0, option_name(option))
}

/// QEMU's text for a payload on an option that takes none.
fn unexpected_length(option: OptionType) -> String {
    format!("option '{}' has unexpected length", option_name(option))
}

fn too_big(option: OptionType, len: u32) -> String {
    format!(
        "option '{}' payload of {len} bytes is too large",
        option_name(option)
    )
}

#[cfg(test)]
mod tests;
