//! The TDX #VE handler.
