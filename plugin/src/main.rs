mod cmd;
mod cni;
mod dataplane;
mod ipam;

fn main() {}
