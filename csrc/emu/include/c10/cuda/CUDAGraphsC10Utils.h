// CPU emulation: nothing is ever captured into a CUDA graph.
#pragma once
#include "CUDAStream.h"
