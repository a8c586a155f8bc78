//! The client side of the fixed-newstyle handshake, as a state machine: what
//! the NBD client block driver (`driver=nbd`) speaks to a server, in the
//! order QEMU's client speaks it.
//!
//! The shell writes [`ClientHandshake::take_output`] after every call, feeds
//! socket bytes with [`ClientHandshake::receive`] and calls
//! [`ClientHandshake::advance`] until it is `Done`.
//!
//! ```text
//!  Greeting ─► (STARTTLS ─► StartTls: the shell wraps the socket, tls_started)
//!     ─► STRUCTURED_REPLY ─► SET_META_CONTEXT (one query, when wanted and structured)
//!     ─► GO (asks for BLOCK_SIZE) ─► Done
//!                    └─ ERR_UNSUP ─► EXPORT_NAME ─► Done
//! ```
//!
//! Extended headers are not asked for: 64-bit lengths buy a client whose
//! requests the block layer already cuts to `max_transfer` nothing.

use thiserror::Error;

use crate::client::{
    client_flags, decode_export_name_reply, decode_greeting, decode_info, decode_meta_context,
    decode_option_reply, go, option, set_meta_context, ClientError, Info, OptionReply,
};
use crate::consts::*;
use crate::export::BlockSize;
use crate::types::{InfoType, OptionReplyType, OptionType};

/// What the client asks for.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub export: String,
    /// Send STARTTLS first and stop at [`ClientStep::StartTls`].
    pub tls: bool,
    /// The one metadata context block status reports (`base:allocation`, or
    /// `qemu:dirty-bitmap:NAME` for QEMU's `x-dirty-bitmap`).
    pub meta_context: Option<String>,
}

/// The outcome of a successful handshake: what transmission needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientNegotiated {
    pub size: u64,
    /// Transmission flags (`FLAG_*`).
    pub flags: u16,
    pub structured_replies: bool,
    /// The id of the context asked for, if the server selected it.
    pub meta_context_id: Option<u32>,
    /// The server's NBD_INFO_BLOCK_SIZE, if it sent one.
    pub block_size: Option<BlockSize>,
}

/// What the shell must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientStep {
    /// Read more bytes and call `receive`, then `advance`.
    NeedInput,
    /// Write the output, run the TLS handshake, call `tls_started`, then `advance`.
    StartTls,
    /// Write the output (nothing, but by rule), then enter transmission.
    Done(ClientNegotiated),
}

/// Why the handshake failed. The texts are QEMU's where it has one.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ClientHandshakeError {
    #[error("Malformed reply from server: {0}")]
    Codec(#[from] ClientError),
    #[error("Server does not support 'fixed newstyle' negotiation")]
    NotFixedNewstyle,
    /// STARTTLS refused (a server without TLS); `message` is the server's.
    /// QEMU prints it only as a hint on the command line, never over QMP.
    #[error("Denied by server for option 5 (starttls)")]
    TlsUnsupported { message: String },
    /// NBD_OPT_GO refused until TLS is negotiated (no tls-creds given).
    #[error("TLS negotiation required before option 7 (go)")]
    TlsRequired { message: String },
    #[error("Requested export not available")]
    ExportNotAvailable,
    #[error("Server rejected option {option:?} ({reply:?}): {message}")]
    Refused {
        option: OptionType,
        reply: OptionReplyType,
        message: String,
    },
    #[error("Malformed reply from server: {0}")]
    Malformed(&'static str),
    #[error("Unexpected reply {reply:?} to option {option:?}")]
    Unexpected {
        option: OptionType,
        reply: OptionReplyType,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Greeting,
    StartTlsReply,
    AwaitTls,
    Structured,
    MetaContext,
    Go,
    ExportName,
    Done,
}

/// The client's handshake in progress.
#[derive(Debug)]
pub struct ClientHandshake {
    config: ClientConfig,
    phase: Phase,
    input: Vec<u8>,
    output: Vec<u8>,
    no_zeroes: bool,
    structured: bool,
    meta_context_id: Option<u32>,
    export: Option<(u64, u16)>,
    block_size: Option<BlockSize>,
}

type Advanced = Result<Option<ClientStep>, ClientHandshakeError>;

impl ClientHandshake {
    pub fn new(config: ClientConfig) -> Self {
        Self {
            config,
            phase: Phase::Greeting,
            input: Vec::new(),
            output: Vec::new(),
            no_zeroes: false,
            structured: false,
            meta_context_id: None,
            export: None,
            block_size: None,
        }
    }

    pub fn receive(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// The TLS session is up: negotiation starts again inside it.
    pub fn tls_started(&mut self) {
        if self.phase == Phase::AwaitTls {
            self.input.clear();
            self.start_options();
        }
    }

    /// Bytes received past the end of the handshake (none from a correct server).
    pub fn take_leftover(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.input)
    }

    /// Runs as far as the input allows.
    pub fn advance(&mut self) -> Result<ClientStep, ClientHandshakeError> {
        loop {
            let step = match self.phase {
                Phase::Greeting => self.greeting()?,
                Phase::AwaitTls => Some(ClientStep::StartTls),
                Phase::ExportName => self.export_name_reply()?,
                Phase::Done => Some(ClientStep::Done(self.negotiated()?)),
                _ => match decode_option_reply(&self.input)? {
                    None => Some(ClientStep::NeedInput),
                    Some((reply, used)) => {
                        self.input.drain(..used);
                        self.option_reply(reply)?
                    }
                },
            };
            if let Some(step) = step {
                return Ok(step);
            }
        }
    }

    fn greeting(&mut self) -> Advanced {
        let Some((flags, used)) = decode_greeting(&self.input)? else {
            return Ok(Some(ClientStep::NeedInput));
        };
        self.input.drain(..used);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientHandshakeError::NotFixedNewstyle);
        }
        self.no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let mut ours = CLIENT_FLAG_FIXED_NEWSTYLE;
        if self.no_zeroes {
            ours |= CLIENT_FLAG_NO_ZEROES;
        }
        client_flags(&mut self.output, ours);
        match self.config.tls {
            true => {
                option(&mut self.output, OptionType::STARTTLS, &[]);
                self.phase = Phase::StartTlsReply;
            }
            false => self.start_options(),
        }
        Ok(None)
    }

    fn start_options(&mut self) {
        self.structured = false;
        self.meta_context_id = None;
        option(&mut self.output, OptionType::STRUCTURED_REPLY, &[]);
        self.phase = Phase::Structured;
    }

    fn option_reply(&mut self, reply: OptionReply) -> Advanced {
        let expected = match self.phase {
            Phase::StartTlsReply => OptionType::STARTTLS,
            Phase::Structured => OptionType::STRUCTURED_REPLY,
            Phase::MetaContext => OptionType::SET_META_CONTEXT,
            _ => OptionType::GO,
        };
        if reply.option != expected {
            return Err(ClientHandshakeError::Unexpected {
                option: reply.option,
                reply: reply.reply,
            });
        }
        match self.phase {
            Phase::StartTlsReply => self.starttls_reply(reply),
            Phase::Structured => {
                // Any error means "no structured replies": the client goes on without.
                self.structured = reply.reply == OptionReplyType::ACK;
                self.after_structured();
                Ok(None)
            }
            Phase::MetaContext => self.meta_reply(reply),
            _ => self.go_reply(reply),
        }
    }

    fn starttls_reply(&mut self, reply: OptionReply) -> Advanced {
        match reply.reply {
            OptionReplyType::ACK => {
                self.phase = Phase::AwaitTls;
                Ok(Some(ClientStep::StartTls))
            }
            _ => Err(ClientHandshakeError::TlsUnsupported {
                message: reply.message(),
            }),
        }
    }

    fn after_structured(&mut self) {
        match (&self.config.meta_context, self.structured) {
            (Some(query), true) => {
                let query = query.clone();
                set_meta_context(&mut self.output, &self.config.export, &[&query]);
                self.phase = Phase::MetaContext;
            }
            _ => self.send_go(),
        }
    }

    fn send_go(&mut self) {
        go(
            &mut self.output,
            &self.config.export,
            &[InfoType::BLOCK_SIZE],
        );
        self.phase = Phase::Go;
    }

    fn meta_reply(&mut self, reply: OptionReply) -> Advanced {
        match reply.reply {
            OptionReplyType::META_CONTEXT => {
                let (id, name) = decode_meta_context(&reply.data)
                    .ok_or(ClientHandshakeError::Malformed("bad NBD_REP_META_CONTEXT"))?;
                if Some(&name) != self.config.meta_context.as_ref() {
                    return Err(ClientHandshakeError::Malformed(
                        "server selected a context that was not asked for",
                    ));
                }
                self.meta_context_id = Some(id);
            }
            // The end of the list, or a server without the extension (as QEMU, go on without).
            _ => self.send_go(),
        }
        Ok(None)
    }

    fn go_reply(&mut self, reply: OptionReply) -> Advanced {
        match reply.reply {
            OptionReplyType::INFO => {
                match decode_info(&reply.data).ok_or(ClientHandshakeError::Malformed(
                    "NBD_REP_INFO of the wrong length",
                ))? {
                    Info::Export { size, flags } => self.export = Some((size, flags)),
                    Info::BlockSize(b) => self.block_size = Some(valid_block_size(b)?),
                    _ => {}
                }
                Ok(None)
            }
            OptionReplyType::ACK => {
                self.phase = Phase::Done;
                Ok(None)
            }
            OptionReplyType::ERR_UNSUP => {
                // An old server: the export by name, with no way to say it is missing.
                option(
                    &mut self.output,
                    OptionType::EXPORT_NAME,
                    self.config.export.as_bytes(),
                );
                self.phase = Phase::ExportName;
                Ok(None)
            }
            OptionReplyType::ERR_UNKNOWN => Err(ClientHandshakeError::ExportNotAvailable),
            OptionReplyType::ERR_TLS_REQD => Err(ClientHandshakeError::TlsRequired {
                message: reply.message(),
            }),
            r if r.is_error() => Err(ClientHandshakeError::Refused {
                option: reply.option,
                reply: r,
                message: reply.message(),
            }),
            // Other informational replies (NBD_REP_SERVER...) are ignored, as the spec asks.
            _ => Ok(None),
        }
    }

    fn export_name_reply(&mut self) -> Advanced {
        let Some((size, flags, used)) = decode_export_name_reply(&self.input, self.no_zeroes)
        else {
            return Ok(Some(ClientStep::NeedInput));
        };
        self.input.drain(..used);
        self.export = Some((size, flags));
        // EXPORT_NAME never brings structured replies into force for an old server.
        self.phase = Phase::Done;
        Ok(None)
    }

    fn negotiated(&self) -> Result<ClientNegotiated, ClientHandshakeError> {
        let (size, flags) = self.export.ok_or(ClientHandshakeError::Malformed(
            "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT",
        ))?;
        Ok(ClientNegotiated {
            size,
            flags,
            structured_replies: self.structured,
            meta_context_id: self.meta_context_id,
            block_size: self.block_size,
        })
    }
}

/// The spec's rules for NBD_INFO_BLOCK_SIZE: powers of two, minimum at most
/// 64 KiB, preferred at least the minimum, maximum a multiple of the minimum.
fn valid_block_size(b: BlockSize) -> Result<BlockSize, ClientHandshakeError> {
    let ok = b.min.is_power_of_two()
        && b.min <= 64 * 1024
        && b.preferred.is_power_of_two()
        && b.preferred >= b.min
        && b.max >= b.min
        && (b.max == u32::MAX || b.max.is_multiple_of(b.min));
    match ok {
        true => Ok(b),
        false => Err(ClientHandshakeError::Malformed(
            "server sent an invalid NBD_INFO_BLOCK_SIZE",
        )),
    }
}

#[cfg(test)]
mod tests;
