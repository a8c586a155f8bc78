//! One handler per option the server understands. Each gets the whole
//! payload (already bounded by `ServerHandshake::plan`) and queues its
//! replies; texts follow QEMU's so clients print the same messages.

use super::meta::{self, QueryMode};
use super::wire::{
    info_reply, option_name, option_reply, parse_info_request, parse_meta_queries, sanitize_name,
    truncate_utf8, Reader,
};
use super::{unsupported, HandshakeError, Negotiated, ServerHandshake, Step, TlsMode};
use crate::consts::*;
use crate::export::{ExportCatalog, ExportInfo, MetaContext};
use crate::types::{InfoType, OptionReplyType, OptionType};

/// An option answered with an error reply: its type and message.
type Refusal = (OptionReplyType, String);

impl ServerHandshake {
    pub(super) fn handle_option(
        &mut self,
        option: OptionType,
        payload: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<Step, HandshakeError> {
        let step = match option {
            OptionType::EXPORT_NAME => return self.export_name(payload, catalog),
            OptionType::LIST => self.list(catalog),
            OptionType::STARTTLS => self.starttls(),
            OptionType::STRUCTURED_REPLY => self.structured_reply(),
            OptionType::EXTENDED_HEADERS => self.extended_headers(),
            OptionType::INFO | OptionType::GO => self.info_or_go(option, payload, catalog),
            OptionType::LIST_META_CONTEXT => {
                self.meta_context(option, payload, catalog, QueryMode::List)
            }
            OptionType::SET_META_CONTEXT => {
                self.meta_context(option, payload, catalog, QueryMode::Set)
            }
            // `plan` skips every other option; answer defensively anyway.
            _ => {
                self.error(option, OptionReplyType::ERR_UNSUP, &unsupported(option));
                Step::Continue
            }
        };
        Ok(step)
    }

    /// NBD_OPT_EXPORT_NAME cannot fail politely: an unknown export ends the
    /// connection. The reply has no option-reply framing.
    fn export_name(
        &mut self,
        payload: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Result<Step, HandshakeError> {
        let export = lookup(catalog, payload)
            .ok_or_else(|| HandshakeError::UnknownExport(sanitize_name(payload)))?;
        let negotiated = self.negotiated(export);
        let out = &mut self.output;
        out.extend_from_slice(&negotiated.export.size.to_be_bytes());
        out.extend_from_slice(&negotiated.transmission_flags.to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; EXPORT_NAME_PADDING]);
        }
        Ok(Step::Done(Box::new(negotiated)))
    }

    /// The final state for `export`: meta contexts only if the last
    /// SET_META_CONTEXT named this very export.
    fn negotiated(&mut self, export: ExportInfo) -> Negotiated {
        let structured = self.session.structured_replies;
        let extended = self.session.extended_headers;
        let meta_contexts = match self.session.meta.take() {
            Some((name, contexts)) if name == export.name => contexts,
            _ => Vec::new(),
        };
        Negotiated {
            transmission_flags: export.transmission_flags(structured)
                | status_payload_flag(extended && !meta_contexts.is_empty()),
            structured_replies: structured,
            extended_headers: extended,
            meta_contexts,
            export,
        }
    }

    /// Whether GO for `export` will leave meta contexts selected: the last
    /// SET_META_CONTEXT named it and selected at least one.
    fn has_contexts_for(&self, export: &ExportInfo) -> bool {
        matches!(&self.session.meta, Some((name, c)) if *name == export.name && !c.is_empty())
    }

    /// One NBD_REP_SERVER (name length, name, description) per export, then ACK.
    fn list(&mut self, catalog: &dyn ExportCatalog) -> Step {
        let option = OptionType::LIST;
        for (name, description) in catalog.list() {
            let name = truncate_utf8(&name, MAX_STRING);
            let mut data = Vec::with_capacity(4 + name.len());
            data.extend_from_slice(&(name.len() as u32).to_be_bytes());
            data.extend_from_slice(name.as_bytes());
            if let Some(d) = description {
                data.extend_from_slice(truncate_utf8(&d, MAX_STRING).as_bytes());
            }
            option_reply(&mut self.output, option, OptionReplyType::SERVER, &data);
        }
        self.ack(option);
        Step::Continue
    }

    fn starttls(&mut self) -> Step {
        let option = OptionType::STARTTLS;
        if self.config.tls == TlsMode::None {
            self.error(option, OptionReplyType::ERR_POLICY, "TLS not configured");
        } else if self.tls_active {
            self.error(option, OptionReplyType::ERR_INVALID, "TLS already enabled");
        } else {
            self.ack(option);
            return Step::StartTls;
        }
        Step::Continue
    }

    fn structured_reply(&mut self) -> Step {
        let option = OptionType::STRUCTURED_REPLY;
        if self.session.extended_headers {
            let msg = "extended headers already negotiated";
            self.error(option, OptionReplyType::ERR_EXT_HEADER_REQD, msg);
        } else if self.session.structured_replies {
            let msg = "structured reply already negotiated";
            self.error(option, OptionReplyType::ERR_INVALID, msg);
        } else {
            self.session.structured_replies = true;
            self.ack(option);
        }
        Step::Continue
    }

    /// Extended headers imply structured replies; they may follow
    /// STRUCTURED_REPLY, never come twice (QEMU's texts and reply types).
    fn extended_headers(&mut self) -> Step {
        let option = OptionType::EXTENDED_HEADERS;
        if self.session.extended_headers {
            let msg = "extended headers already negotiated";
            self.error(option, OptionReplyType::ERR_INVALID, msg);
        } else {
            self.session.extended_headers = true;
            self.session.structured_replies = true;
            self.ack(option);
        }
        Step::Continue
    }

    /// NBD_OPT_INFO describes an export; NBD_OPT_GO does the same and then
    /// ends the handshake. The replies are QEMU's, in QEMU's order: NAME (if
    /// asked), DESCRIPTION (if set), BLOCK_SIZE (always), EXPORT, ACK.
    fn info_or_go(
        &mut self,
        option: OptionType,
        payload: &[u8],
        catalog: &dyn ExportCatalog,
    ) -> Step {
        let request = match parse_info_request(option, payload) {
            Ok(request) => request,
            Err(e) => return self.refuse(option, (OptionReplyType::ERR_INVALID, e.to_string())),
        };
        let Some(export) = lookup(catalog, request.name) else {
            return self.refuse(option, not_present(request.name));
        };
        let wants_block_size = request.requests.contains(&InfoType::BLOCK_SIZE);
        if request.requests.contains(&InfoType::NAME) {
            let name = truncate_utf8(&export.name, MAX_STRING);
            info_reply(&mut self.output, option, InfoType::NAME, name.as_bytes());
        }
        if let Some(d) = &export.description {
            let d = truncate_utf8(d, MAX_STRING);
            info_reply(
                &mut self.output,
                option,
                InfoType::DESCRIPTION,
                d.as_bytes(),
            );
        }
        self.block_size_info(option, &export, wants_block_size);
        if option == OptionType::INFO && !wants_block_size && export.block_size.min > 1 {
            let msg = "request NBD_INFO_BLOCK_SIZE to use this export".to_string();
            return self.refuse(option, (OptionReplyType::ERR_BLOCK_SIZE_REQD, msg));
        }
        // BLOCK_STAT_PAYLOAD: in extended mode, on INFO always, on GO when
        // the client will have contexts to filter (QEMU's rule).
        let filterable = option == OptionType::INFO || self.has_contexts_for(&export);
        let flags = export.transmission_flags(self.session.structured_replies)
            | status_payload_flag(self.session.extended_headers && filterable);
        let mut body = export.size.to_be_bytes().to_vec();
        body.extend_from_slice(&flags.to_be_bytes());
        info_reply(&mut self.output, option, InfoType::EXPORT, &body);
        self.ack(option);
        match option {
            OptionType::GO => Step::Done(Box::new(self.negotiated(export))),
            _ => Step::Continue,
        }
    }

    /// NBD_INFO_BLOCK_SIZE. QEMU tells the real minimum only to clients that
    /// promise to honour it (they asked, or this is INFO); GO clients that
    /// did not ask get 1, and the server copes with unaligned requests.
    fn block_size_info(&mut self, option: OptionType, export: &ExportInfo, asked: bool) {
        let bs = export.block_size;
        let min = match asked || option == OptionType::INFO {
            true => bs.min,
            false => 1,
        };
        let mut body = min.to_be_bytes().to_vec();
        body.extend_from_slice(&bs.preferred.max(min).to_be_bytes());
        body.extend_from_slice(&bs.max.to_be_bytes());
        info_reply(&mut self.output, option, InfoType::BLOCK_SIZE, &body);
    }

    /// LIST_META_CONTEXT answers what queries would select (ids 0);
    /// SET_META_CONTEXT replaces the selection, even when it then fails.
    fn meta_context(
        &mut self,
        option: OptionType,
        payload: &[u8],
        catalog: &dyn ExportCatalog,
        mode: QueryMode,
    ) -> Step {
        if mode == QueryMode::Set {
            self.session.meta = None;
            if !self.session.structured_replies {
                let msg = format!(
                    "request option '{}' when structured reply is not negotiated",
                    option_name(option)
                );
                return self.refuse(option, (OptionReplyType::ERR_INVALID, msg));
            }
        }
        let (export, queries) = match parse_meta(option, payload, catalog) {
            Ok(parsed) => parsed,
            Err(refusal) => return self.refuse(option, refusal),
        };
        let selected = meta::select(&export, &queries, mode);
        let chosen = self.send_meta_contexts(option, &export, selected, mode);
        self.ack(option);
        if mode == QueryMode::Set {
            self.session.meta = Some((export.name, chosen));
        }
        Step::Continue
    }

    /// One NBD_REP_META_CONTEXT (id, name) per context; returns them with ids.
    fn send_meta_contexts(
        &mut self,
        option: OptionType,
        export: &ExportInfo,
        selected: Vec<MetaContext>,
        mode: QueryMode,
    ) -> Vec<(u32, MetaContext)> {
        let mut chosen = Vec::with_capacity(selected.len());
        for context in selected {
            let id = match mode {
                QueryMode::List => 0,
                QueryMode::Set => export.context_id(&context).unwrap_or(0),
            };
            let name = context.name();
            let mut data = id.to_be_bytes().to_vec();
            data.extend_from_slice(truncate_utf8(&name, MAX_STRING).as_bytes());
            option_reply(
                &mut self.output,
                option,
                OptionReplyType::META_CONTEXT,
                &data,
            );
            chosen.push((id, context));
        }
        chosen
    }

    fn refuse(&mut self, option: OptionType, (reply, message): Refusal) -> Step {
        self.error(option, reply, &message);
        Step::Continue
    }
}

/// NBD_FLAG_BLOCK_STATUS_PAYLOAD when `on`.
fn status_payload_flag(on: bool) -> u16 {
    match on {
        true => FLAG_BLOCK_STATUS_PAYLOAD,
        false => 0,
    }
}

/// Export name, then queries, as QEMU reads them: a malformed name is
/// ERR_INVALID, an unknown export ERR_UNKNOWN (whatever follows it), then
/// malformed queries ERR_INVALID.
fn parse_meta<'a>(
    option: OptionType,
    payload: &'a [u8],
    catalog: &dyn ExportCatalog,
) -> Result<(ExportInfo, Vec<&'a [u8]>), Refusal> {
    let invalid = |e: super::wire::PayloadError| (OptionReplyType::ERR_INVALID, e.to_string());
    let mut reader = Reader::new(option, payload);
    let name = reader.name().map_err(invalid)?;
    let export = lookup(catalog, name).ok_or_else(|| not_present(name))?;
    let queries = parse_meta_queries(&mut reader).map_err(invalid)?;
    Ok((export, queries))
}

/// Looks an export up by its raw name; a name that is not UTF-8 is unknown.
fn lookup(catalog: &dyn ExportCatalog, name: &[u8]) -> Option<ExportInfo> {
    catalog.lookup(std::str::from_utf8(name).ok()?)
}

fn not_present(name: &[u8]) -> Refusal {
    let msg = format!("export '{}' not present", sanitize_name(name));
    (OptionReplyType::ERR_UNKNOWN, msg)
}
