"""The `kvm` backend: the real /dev/kvm through fcntl.ioctl, mmap and ctypes."""
