"""``python -m sandbox_kernel -f CONNECTION_FILE``: the kernel that the kernelspec starts."""

from sandbox_kernel.kernel import SandboxKernel, SandboxKernelApp

if __name__ == "__main__":
    SandboxKernelApp.launch_instance(kernel_class=SandboxKernel)
