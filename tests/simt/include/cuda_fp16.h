// Emulator stand-in for CUDA's header (tests/simt).
#pragma once
#include "simt_half.h"
