// Stand-in for the CUDA header of this name when device code is compiled for the
// CPU emulator (see cuda_emu.h).
#include "cuda_emu.h"
