//! The server side of the fixed-newstyle handshake, as a state machine.
//!
//! The shell feeds socket bytes with [`ServerHandshake::receive`], calls
//! [`ServerHandshake::advance`] and writes [`ServerHandshake::take_output`]
//! after every call. Everything negotiated lives in one [`Session`] value that
//! a completed STARTTLS replaces wholesale, so nothing negotiated in plaintext
//! survives the upgrade (the lesson of CVE-2021-3716).

mod meta;
mod wire;

use thiserror::Error;

use crate::consts::*;
use crate::export::{ExportCatalog, ExportInfo, MetaContext};
use crate::types::{OptionType, ReplyType};
use meta::QueryMode;
use wire::{error_reply, option_reply, parse_info_request, parse_meta_request};

/// Option payloads up to this size are buffered; longer ones are skipped as
/// they stream in (no known option needs more), so a handshaking client pins
/// at most this much memory.
const MAX_BUFFERED_OPTION: u32 = 64 * 1024;

/// Whether the server requires TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    None,
    Required,
}

#[derive(Clone, Debug)]
pub struct HandshakeConfig {
    pub tls: TlsMode,
}

/// The outcome of a successful handshake.
#[derive(Clone, Debug)]
pub struct Negotiated {
    pub export: ExportInfo,
    pub structured_replies: bool,
    /// Selected contexts with their ids, for BLOCK_STATUS.
    pub meta_contexts: Vec<(u32, MetaContext)>,
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
    #[error("client sent unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    #[error("option length {0} is too large")]
    OptionTooLong(u32),
    #[error("client without fixed newstyle sent option {0:?}")]
    NotFixedNewstyle(OptionType),
    #[error("NBD_OPT_EXPORT_NAME for unknown export '{0}'")]
    UnknownExport(String),
    #[error("NBD_OPT_EXPORT_NAME before TLS")]
    TlsRequired,
    #[error("export name is not a valid string")]
    BadExportName,
    #[error("handshake already finished")]
    Finished,
}

/// Everything negotiated so far; replaced whole by STARTTLS.
#[derive(Debug, Default)]
struct Session {
    structured_replies: bool,
    /// The export name given to SET_META_CONTEXT and what it selected.
    meta: Option<(String, Vec<(u32, MetaContext)>)>,
}

#[derive(Debug)]
enum Phase {
    ClientFlags,
    Options,
    /// Discarding the rest of an oversized option payload, then answering it.
    Skipping {
        option: OptionType,
        remaining: u64,
    },
    AwaitingTls,
    Done,
}

pub struct ServerHandshake {
    config: HandshakeConfig,
    input: Vec<u8>,
    output: Vec<u8>,
    phase: Phase,
    session: Session,
    fixed_newstyle: bool,
    no_zeroes: bool,
    tls_active: bool,
}

impl std::fmt::Debug for ServerHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandshake")
            .field("phase", &self.phase)
            .field("tls_active", &self.tls_active)
            .finish_non_exhaustive()
    }
}

/// What handling one option decided.
enum Step {
    Continue,
    StartTls,
    Done(Box<Negotiated>),
    Closed,
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

    pub fn receive(&mut self, data: &[u8]) {
        self.input.extend_from_slice(data);
    }

    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Bytes received after the handshake ended: the client's first requests.
    pub fn take_leftover(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.input)
    }

    /// The TLS session is up: forget everything negotiated in plaintext,
    /// including any plaintext the client sent after STARTTLS.
    pub fn tls_established(&mut self) {
        self.tls_active = true;
        self.session = Session::default();
        self.input.clear();
        self.phase = Phase::Options;
    }

    /// Processes buffered input as far as it goes.
    pub fn advance(
        &mut self,
        catalog: &dyn ExportCatalog,
    ) -> Result<HandshakeStatus, HandshakeError> {
        loop {
            match self.phase {
                Phase::Done => return Err(HandshakeError::Finished),
                Phase::AwaitingTls => return Ok(HandshakeStatus::StartTls),
                Phase::ClientFlags => {
                    let Some(flags) = self.take_u32() else {
                        return Ok(HandshakeStatus::NeedInput);
                    };
                    self.accept_client_flags(flags)?;
                }
                Phase::Skipping { option, remaining } => {
                    let n = remaining.min(self.input.len() as u64) as usize;
                    self.input.drain(..n);
                    let remaining = remaining - n as u64;
                    if remaining > 0 {
                        self.phase = Phase::Skipping { option, remaining };
                        return Ok(HandshakeStatus::NeedInput);
                    }
                    self.phase = Phase::Options;
                    self.answer_skipped(option);
                }
                Phase::Options => match self.next_option(catalog)? {
                    None => return Ok(HandshakeStatus::NeedInput),
                    Some(Step::Continue) => {}
                    Some(Step::StartTls) => {
                        self.phase = Phase::AwaitingTls;
                        return Ok(HandshakeStatus::StartTls);
                    }
                    Some(Step::Done(n)) => {
                        self.phase = Phase::Done;
                        return Ok(HandshakeStatus::Done(n));
                    }
                    Some(Step::Closed) => {
                        self.phase = Phase::Done;
                        return Ok(HandshakeStatus::Closed);
                    }
                },
            }
        }
    }

    fn take_u32(&mut self) -> Option<u32> {
        let bytes: [u8; 4] = self.input.get(..4)?.try_into().ok()?;
        self.input.drain(..4);
        Some(u32::from_be_bytes(bytes))
    }

    fn accept_client_flags(&mut self, flags: u32) -> Result<(), HandshakeError> {
        let known = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;
        if flags & !known != 0 {
            return Err(HandshakeError::UnknownClientFlags(flags));
        }
        self.fixed_newstyle = flags & CLIENT_FLAG_FIXED_NEWSTYLE != 0;
        self.no_zeroes = flags & CLIENT_FLAG_NO_ZEROES != 0;
        self.phase = Phase::Options;
        Ok(())
    }

    /// Reads one option header (and payload, when small) and handles it.
    fn next_option(&mut self, catalog: &dyn ExportCatalog) -> Result<Option<Step>, HandshakeError> {
        let Some(header) = self.input.get(..OPTION_HEADER_LEN) else {
            return Ok(None);
        };
        let magic = u64::from_be_bytes(header[..8].try_into().unwrap_or_default());
        let option = OptionType(u32::from_be_bytes(
            header[8..12].try_into().unwrap_or_default(),
        ));
        let len = u32::from_be_bytes(header[12..16].try_into().unwrap_or_default());
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        if len > MAX_OPTION_LEN {
            return Err(HandshakeError::OptionTooLong(len));
        }
        if !self.fixed_newstyle && option != OptionType::EXPORT_NAME {
            return Err(HandshakeError::NotFixedNewstyle(option));
        }
        if len > MAX_BUFFERED_OPTION {
            self.input.drain(..OPTION_HEADER_LEN);
            self.phase = Phase::Skipping {
                option,
                remaining: u64::from(len),
            };
            return Ok(Some(Step::Continue));
        }
        let total = OPTION_HEADER_LEN + len as usize;
        if self.input.len() < total {
            return Ok(None);
        }
        let payload: Vec<u8> = self.input[OPTION_HEADER_LEN..total].to_vec();
        self.input.drain(..total);
        self.handle_option(option, &payload, catalog).map(Some)
    }

    /// Answers an option whose payload was too large to buffer.
    fn answer_skipped(&mut self, option: OptionType) {
        let out = &mut self.output;
        if self.config.tls == TlsMode::Required && !self.tls_active {
            let msg = format!("Option {:#x} not permitted before TLS", option.0);
            return error_reply(out, option, ReplyType::ERR_TLS_REQD, &msg);
        }
        match option.name() {
            None => error_reply(out, option, ReplyType::ERR_UNSUP, &unsupported(option)),
            Some(_) => error_reply(
                out,
                option,
                ReplyType::ERR_TOO_BIG,
                "option payload too large",
            ),
        }
    }

    fn handle_option(
        &mut self,
        option: OptionType,
        payload: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<Step, HandshakeError> {
        if self.config.tls == TlsMode::Required && !self.tls_active {
            return self.handle_before_tls(option, payload);
        }
        match option {
            OptionType::EXPORT_NAME => self.export_name(payload, catalog),
            OptionType::ABORT => {
                option_reply(&mut self.output, option, ReplyType::ACK, &[]);
                Ok(Step::Closed)
            }
            OptionType::LIST => Ok(self.list(payload, catalog)),
            OptionType::STARTTLS => Ok(self.starttls(payload)),
            OptionType::INFO | OptionType::GO => Ok(self.info_or_go(option, payload, catalog)),
            OptionType::STRUCTURED_REPLY => Ok(self.structured_reply(payload)),
            OptionType::LIST_META_CONTEXT => {
                Ok(self.meta_context(option, payload, catalog, QueryMode::List))
            }
            OptionType::SET_META_CONTEXT => {
                Ok(self.meta_context(option, payload, catalog, QueryMode::Set))
            }
            _ => {
                error_reply(
                    &mut self.output,
                    option,
                    ReplyType::ERR_UNSUP,
                    &unsupported(option),
                );
                Ok(Step::Continue)
            }
        }
    }

    /// FORCEDTLS before the upgrade: only STARTTLS (and ABORT) get anywhere.
    fn handle_before_tls(
        &mut self,
        option: OptionType,
        payload: &[u8],
    ) -> Result<Step, HandshakeError> {
        match option {
            OptionType::STARTTLS => Ok(self.starttls(payload)),
            OptionType::EXPORT_NAME => Err(HandshakeError::TlsRequired),
            OptionType::ABORT => {
                option_reply(&mut self.output, option, ReplyType::ACK, &[]);
                Ok(Step::Closed)
            }
            _ => {
                let msg = format!("Option {:#x} not permitted before TLS", option.0);
                error_reply(&mut self.output, option, ReplyType::ERR_TLS_REQD, &msg);
                Ok(Step::Continue)
            }
        }
    }

    fn export_name(
        &mut self,
        payload: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<Step, HandshakeError> {
        if payload.len() > MAX_STRING {
            return Err(HandshakeError::BadExportName);
        }
        let name = std::str::from_utf8(payload).map_err(|_| HandshakeError::BadExportName)?;
        let export = catalog
            .lookup(name)
            .ok_or_else(|| HandshakeError::UnknownExport(name.to_string()))?;
        let negotiated = self.negotiated(export);
        self.output
            .extend_from_slice(&negotiated.export.size.to_be_bytes());
        self.output
            .extend_from_slice(&negotiated.transmission_flags.to_be_bytes());
        if !self.no_zeroes {
            self.output.extend_from_slice(&[0u8; 124]);
        }
        Ok(Step::Done(Box::new(negotiated)))
    }

    /// The final state for `export`: meta contexts only if SET named this export.
    fn negotiated(&mut self, export: ExportInfo) -> Negotiated {
        let structured = self.session.structured_replies;
        let meta_contexts = match self.session.meta.take() {
            Some((name, contexts)) if name == export.name => contexts,
            _ => Vec::new(),
        };
        Negotiated {
            transmission_flags: export.transmission_flags(structured),
            structured_replies: structured,
            meta_contexts,
            export,
        }
    }

    fn list(&mut self, payload: &[u8], catalog: &dyn ExportCatalog) -> Step {
        let option = OptionType::LIST;
        if !payload.is_empty() {
            error_reply(
                &mut self.output,
                option,
                ReplyType::ERR_INVALID,
                "no payload expected",
            );
            return Step::Continue;
        }
        for (name, description) in catalog.list() {
            let mut data = Vec::with_capacity(4 + name.len());
            data.extend_from_slice(&(name.len() as u32).to_be_bytes());
            data.extend_from_slice(name.as_bytes());
            if let Some(d) = description {
                data.extend_from_slice(d.as_bytes());
            }
            option_reply(&mut self.output, option, ReplyType::SERVER, &data);
        }
        option_reply(&mut self.output, option, ReplyType::ACK, &[]);
        Step::Continue
    }

    fn starttls(&mut self, payload: &[u8]) -> Step {
        let option = OptionType::STARTTLS;
        let out = &mut self.output;
        if !payload.is_empty() {
            error_reply(out, option, ReplyType::ERR_INVALID, "no payload expected");
        } else if self.config.tls == TlsMode::None {
            error_reply(out, option, ReplyType::ERR_POLICY, "TLS not configured");
        } else if self.tls_active {
            error_reply(out, option, ReplyType::ERR_INVALID, "TLS already enabled");
        } else {
            option_reply(out, option, ReplyType::ACK, &[]);
            return Step::StartTls;
        }
        Step::Continue
    }

    fn structured_reply(&mut self, payload: &[u8]) -> Step {
        let option = OptionType::STRUCTURED_REPLY;
        let out = &mut self.output;
        if !payload.is_empty() {
            error_reply(out, option, ReplyType::ERR_INVALID, "no payload expected");
        } else if self.session.structured_replies {
            error_reply(
                out,
                option,
                ReplyType::ERR_INVALID,
                "structured reply already negotiated",
            );
        } else {
            self.session.structured_replies = true;
            option_reply(out, option, ReplyType::ACK, &[]);
        }
        Step::Continue
    }

    fn info_or_go(
        &mut self,
        option: OptionType,
        payload: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Step {
        let Some(request) = parse_info_request(payload) else {
            error_reply(
                &mut self.output,
                option,
                ReplyType::ERR_INVALID,
                "malformed NBD_OPT_INFO/GO request",
            );
            return Step::Continue;
        };
        let Some(export) = catalog.lookup(&request.name) else {
            let msg = format!("export '{}' not present", request.name);
            error_reply(&mut self.output, option, ReplyType::ERR_UNKNOWN, &msg);
            return Step::Continue;
        };
        let asked_block_size = request.requests.contains(&INFO_BLOCK_SIZE);
        if request.requests.contains(&INFO_NAME) {
            let mut data = INFO_NAME.to_be_bytes().to_vec();
            data.extend_from_slice(export.name.as_bytes());
            option_reply(&mut self.output, option, ReplyType::INFO, &data);
        }
        if let Some(d) = &export.description {
            let mut data = INFO_DESCRIPTION.to_be_bytes().to_vec();
            data.extend_from_slice(d.as_bytes());
            option_reply(&mut self.output, option, ReplyType::INFO, &data);
        }
        // QEMU advertises the real minimum only to clients that can honour it.
        let honest_min = asked_block_size || option == OptionType::INFO;
        let bs = export.block_size;
        let min = if honest_min { bs.min } else { 1 };
        let mut data = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        data.extend_from_slice(&min.to_be_bytes());
        data.extend_from_slice(&bs.preferred.max(min).to_be_bytes());
        data.extend_from_slice(&bs.max.to_be_bytes());
        option_reply(&mut self.output, option, ReplyType::INFO, &data);
        if option == OptionType::INFO && !asked_block_size && bs.min > 1 {
            let msg = "request NBD_INFO_BLOCK_SIZE to use this export";
            error_reply(
                &mut self.output,
                option,
                ReplyType::ERR_BLOCK_SIZE_REQD,
                msg,
            );
            return Step::Continue;
        }
        let flags = export.transmission_flags(self.session.structured_replies);
        let mut data = INFO_EXPORT.to_be_bytes().to_vec();
        data.extend_from_slice(&export.size.to_be_bytes());
        data.extend_from_slice(&flags.to_be_bytes());
        option_reply(&mut self.output, option, ReplyType::INFO, &data);
        option_reply(&mut self.output, option, ReplyType::ACK, &[]);
        if option == OptionType::GO {
            return Step::Done(Box::new(self.negotiated(export)));
        }
        Step::Continue
    }

    fn meta_context(
        &mut self,
        option: OptionType,
        payload: &[u8],
        catalog: &dyn ExportCatalog,
        mode: QueryMode,
    ) -> Step {
        if mode == QueryMode::Set {
            // SET replaces the selection, even when it then fails.
            self.session.meta = None;
            if !self.session.structured_replies {
                let msg = "request structured replies first";
                error_reply(&mut self.output, option, ReplyType::ERR_INVALID, msg);
                return Step::Continue;
            }
        }
        let Some(request) = parse_meta_request(payload) else {
            error_reply(
                &mut self.output,
                option,
                ReplyType::ERR_INVALID,
                "malformed meta context request",
            );
            return Step::Continue;
        };
        let Some(export) = catalog.lookup(&request.export) else {
            let msg = format!("export '{}' not present", request.export);
            error_reply(&mut self.output, option, ReplyType::ERR_UNKNOWN, &msg);
            return Step::Continue;
        };
        let selected = meta::select(&export, &request.queries, mode);
        let mut chosen = Vec::with_capacity(selected.len());
        for context in selected {
            let id = match mode {
                QueryMode::List => 0,
                QueryMode::Set => export.context_id(&context).unwrap_or(0),
            };
            let mut data = id.to_be_bytes().to_vec();
            data.extend_from_slice(context.name().as_bytes());
            option_reply(&mut self.output, option, ReplyType::META_CONTEXT, &data);
            chosen.push((id, context));
        }
        option_reply(&mut self.output, option, ReplyType::ACK, &[]);
        if mode == QueryMode::Set {
            self.session.meta = Some((request.export, chosen));
        }
        Step::Continue
    }
}

fn unsupported(option: OptionType) -> String {
    format!("Unsupported option {} ({:?})", option.0, option)
}

#[cfg(test)]
mod tests;
