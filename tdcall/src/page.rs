//! Page sizes as the TDX module names them.

/// The base page size.
pub const PAGE_SIZE: u64 = 4096;

/// A page size, as encoded in the level field of TDG.MEM.PAGE.ACCEPT's RCX
/// (TDX Module ABI: 0 = 4 KiB, 1 = 2 MiB, 2 = 1 GiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageLevel {
    /// 4 KiB.
    Size4K = 0,
    /// 2 MiB.
    Size2M = 1,
    /// 1 GiB.
    Size1G = 2,
}

impl PageLevel {
    /// Every level, largest first: the order in which a range is accepted.
    pub const LARGEST_FIRST: [PageLevel; 3] = [PageLevel::Size1G, PageLevel::Size2M, PageLevel::Size4K];

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        PAGE_SIZE << (9 * self as u32)
    }

    /// The next smaller level, if any.
    pub const fn smaller(self) -> Option<PageLevel> {
        match self {
            PageLevel::Size1G => Some(PageLevel::Size2M),
            PageLevel::Size2M => Some(PageLevel::Size4K),
            PageLevel::Size4K => None,
        }
    }

    /// Decodes the ABI encoding.
    pub const fn from_abi(value: u64) -> Option<PageLevel> {
        match value {
            0 => Some(PageLevel::Size4K),
            1 => Some(PageLevel::Size2M),
            2 => Some(PageLevel::Size1G),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_encoding() {
        assert_eq!(PageLevel::Size4K.bytes(), 4096);
        assert_eq!(PageLevel::Size2M.bytes(), 2 << 20);
        assert_eq!(PageLevel::Size1G.bytes(), 1 << 30);
        for level in PageLevel::LARGEST_FIRST {
            assert_eq!(PageLevel::from_abi(level as u64), Some(level));
        }
        assert_eq!(PageLevel::from_abi(3), None);
        assert_eq!(PageLevel::Size1G.smaller(), Some(PageLevel::Size2M));
        assert_eq!(PageLevel::Size4K.smaller(), None);
    }
}
