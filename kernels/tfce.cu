// TFCE union-find sweep, one thread per map (a chunk of permutations).
//
// CUDA port of gpuconn.stats.tfce._sweep (the Numba CPU twin; the tests
// hold this kernel to it). The host side (torch) has already ordered each
// map's voxels by decreasing value and computed the measure M of each
// ordered voxel (M(h) = h^(H+1)/(H+1) for the exact integral, or the
// cumulative sum of h_k^H over the steps h_k <= h for the stepped sum).
//
// Voxels are added in that order into a union-find over the mask's
// neighbour table. Each root keeps its extent and the measure at which it
// last changed; when a component merges at level m it first receives
// extent^E * (M_last - m), added lazily to all its voxels through offsets
// along the parent pointers (weighted union-find). A voxel's TFCE is the
// sum of the offsets on its path to the root.

__device__ __forceinline__ int gpuconn_find_offset(int* parent, double* acc, int v) {
    while (true) {
        int p = parent[v];
        if (p == v) return v;
        int g = parent[p];
        if (g != p) {
            acc[v] += acc[p];
            parent[v] = g;
        }
        v = g;
    }
}

extern "C" __global__ void gpuconn_tfce_sweep(
    const int* __restrict__ order,     // (n_maps, n_vox): voxel indices, first n_sel[m] used
    const double* __restrict__ meas,   // (n_maps, n_vox): measure of each ordered voxel
    const long long* __restrict__ n_sel,  // (n_maps,)
    const int* __restrict__ table,     // (n_vox, k): neighbours, -1 for none
    const double* __restrict__ power,  // (n_vox + 1,): n ** E
    int* parent_all,                   // (n_maps, n_vox), initialised to -1
    int* size_all,                     // (n_maps, n_vox); size, last and acc are set when a voxel is added
    double* last_all,                  // (n_maps, n_vox)
    double* acc_all,                   // (n_maps, n_vox)
    float* out,                        // (n_maps, n_vox), initialised to 0
    int n_maps, int n_vox, int k)
{
    int m = blockIdx.x * blockDim.x + threadIdx.x;
    if (m >= n_maps) return;
    long long base = (long long)m * (long long)n_vox;
    const int* ord = order + base;
    const double* ms = meas + base;
    int* parent = parent_all + base;
    int* size = size_all + base;
    double* last = last_all + base;
    double* acc = acc_all + base;
    long long count = n_sel[m];

    for (long long i = 0; i < count; ++i) {
        int v = ord[i];
        double level = ms[i];
        parent[v] = v;
        size[v] = 1;
        last[v] = level;
        acc[v] = 0.0;
        int rv = v;  // root of v's component, kept up to date through the merges
        for (int j = 0; j < k; ++j) {
            int u = table[(long long)v * k + j];
            if (u < 0 || parent[u] < 0) continue;
            int ru = gpuconn_find_offset(parent, acc, u);
            if (ru == rv) continue;
            acc[ru] += power[size[ru]] * (last[ru] - level);
            acc[rv] += power[size[rv]] * (last[rv] - level);
            last[ru] = level;
            last[rv] = level;
            if (size[ru] < size[rv]) {
                int t = ru; ru = rv; rv = t;
            }
            parent[rv] = ru;
            acc[rv] -= acc[ru];
            size[ru] += size[rv];
            rv = ru;
        }
    }
    for (long long i = 0; i < count; ++i) {  // close every component at M(0) = 0
        int v = ord[i];
        if (parent[v] == v) acc[v] += power[size[v]] * last[v];
    }
    for (long long i = 0; i < count; ++i) {
        int v = ord[i];
        double total = acc[v];
        int x = v;
        while (parent[x] != x) {
            x = parent[x];
            total += acc[x];
        }
        out[base + v] = (float)total;
    }
}
