from adaq.kernels.cutlass_gen.generate import main

main()
