"""``python -m sandbox_kernel -f CONNECTION_FILE``: the kernel that the kernelspec starts."""

from ipykernel.kernelapp import IPKernelApp

from sandbox_kernel.kernel import SandboxKernel

if __name__ == "__main__":
    IPKernelApp.launch_instance(kernel_class=SandboxKernel)
