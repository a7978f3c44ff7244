//! The SEV-SNP #VC handler.
