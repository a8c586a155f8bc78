//! Open newtypes for wire enums: unknown values stay representable (an
//! unknown option is still answered with ERR_UNSUP), and `Debug` prints the
//! protocol's name instead of a number.

macro_rules! wire_enum {
    ($(#[$doc:meta])* $name:ident($repr:ty) { $($(#[$vdoc:meta])* $variant:ident = $value:expr,)* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub $repr);

        impl $name {
            $($(#[$vdoc])* pub const $variant: Self = Self($value);)*

            /// The protocol's name for this value, if it is a known one.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($value => Some(stringify!($variant)),)*
                    _ => None,
                }
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}({:#x})", stringify!($name), self.0),
                }
            }
        }
    };
}

wire_enum! {
    /// NBD_OPT_*: handshake option types.
    OptionType(u32) {
        EXPORT_NAME = 1,
        ABORT = 2,
        LIST = 3,
        PEEK_EXPORT = 4,
        STARTTLS = 5,
        INFO = 6,
        GO = 7,
        STRUCTURED_REPLY = 8,
        LIST_META_CONTEXT = 9,
        SET_META_CONTEXT = 10,
        EXTENDED_HEADERS = 11,
    }
}

wire_enum! {
    /// NBD_REP_*: option reply types (errors have bit 31 set).
    OptionReplyType(u32) {
        ACK = 1,
        SERVER = 2,
        INFO = 3,
        META_CONTEXT = 4,
        ERR_UNSUP = 0x8000_0001,
        ERR_POLICY = 0x8000_0002,
        ERR_INVALID = 0x8000_0003,
        ERR_PLATFORM = 0x8000_0004,
        ERR_TLS_REQD = 0x8000_0005,
        ERR_UNKNOWN = 0x8000_0006,
        ERR_SHUTDOWN = 0x8000_0007,
        ERR_BLOCK_SIZE_REQD = 0x8000_0008,
        ERR_TOO_BIG = 0x8000_0009,
        ERR_EXT_HEADER_REQD = 0x8000_000a,
    }
}

impl OptionReplyType {
    /// Error replies have bit 31 set; clients treat unknown ones as errors too.
    pub fn is_error(self) -> bool {
        self.0 & 0x8000_0000 != 0
    }
}

wire_enum! {
    /// NBD_INFO_*: what an NBD_REP_INFO carries, and what INFO/GO may ask for.
    InfoType(u16) {
        EXPORT = 0,
        NAME = 1,
        DESCRIPTION = 2,
        BLOCK_SIZE = 3,
    }
}

wire_enum! {
    /// NBD_CMD_*: transmission commands.
    CommandType(u16) {
        READ = 0,
        WRITE = 1,
        DISC = 2,
        FLUSH = 3,
        TRIM = 4,
        CACHE = 5,
        WRITE_ZEROES = 6,
        BLOCK_STATUS = 7,
        RESIZE = 8,
    }
}

wire_enum! {
    /// NBD_REPLY_TYPE_*: structured reply chunk types (bit 15 marks errors).
    ReplyType(u16) {
        NONE = 0,
        OFFSET_DATA = 1,
        OFFSET_HOLE = 2,
        BLOCK_STATUS = 5,
        BLOCK_STATUS_EXT = 6,
        ERROR = 0x8001,
        ERROR_OFFSET = 0x8002,
    }
}

impl ReplyType {
    /// Error chunks have bit 15 set, so a client can recognise even unknown ones.
    pub fn is_error(self) -> bool {
        self.0 & 0x8000 != 0
    }
}

wire_enum! {
    /// Error values on the wire (not the host's errno numbering).
    NbdErrno(u32) {
        OK = 0,
        EPERM = 1,
        EIO = 5,
        ENOMEM = 12,
        EINVAL = 22,
        ENOSPC = 28,
        EOVERFLOW = 75,
        ENOTSUP = 95,
        ESHUTDOWN = 108,
    }
}

impl NbdErrno {
    /// Maps a Linux errno to the NBD value the spec asks for: quota and
    /// file-size errors are ENOSPC, anything unknown is EINVAL (which is what
    /// clients assume for values they do not know anyway).
    ///
    /// The numbers are Linux's; this crate links no libc, and the daemon only
    /// runs on Linux.
    pub fn from_os_errno(errno: i32) -> Self {
        match errno {
            0 => Self::OK,
            1 | 13 | 30 => Self::EPERM, // EPERM, EACCES, EROFS
            5 => Self::EIO,
            12 => Self::ENOMEM,
            22 => Self::EINVAL,
            27 | 28 | 122 => Self::ENOSPC, // EFBIG, ENOSPC, EDQUOT
            75 => Self::EOVERFLOW,
            95 => Self::ENOTSUP, // EOPNOTSUPP and ENOTSUP are both 95 on Linux
            108 => Self::ESHUTDOWN,
            _ => Self::EINVAL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_debug_when_known_prints_name() {
        assert_eq!(format!("{:?}", OptionType::GO), "GO");
    }

    #[test]
    fn test_debug_when_unknown_prints_hex() {
        assert_eq!(format!("{:?}", OptionType(0x99)), "OptionType(0x99)");
    }

    #[test]
    fn test_from_os_errno_when_edquot_returns_enospc() {
        assert_eq!(NbdErrno::from_os_errno(122), NbdErrno::ENOSPC);
    }

    #[test]
    fn test_from_os_errno_when_efbig_returns_enospc() {
        assert_eq!(NbdErrno::from_os_errno(27), NbdErrno::ENOSPC);
    }

    #[test]
    fn test_from_os_errno_when_eopnotsupp_returns_enotsup() {
        assert_eq!(NbdErrno::from_os_errno(95), NbdErrno::ENOTSUP);
    }

    #[test]
    fn test_debug_when_errno_known_prints_name() {
        assert_eq!(format!("{:?}", NbdErrno::ESHUTDOWN), "ESHUTDOWN");
    }

    #[test]
    fn test_is_error_when_chunk_type_has_bit_15_returns_true() {
        assert!(ReplyType(0x8005).is_error());
    }

    #[test]
    fn test_from_os_errno_when_unknown_returns_einval() {
        assert_eq!(NbdErrno::from_os_errno(9999), NbdErrno::EINVAL);
    }
}
